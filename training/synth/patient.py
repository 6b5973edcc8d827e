"""Synthetic patients: demographics, body habitus and which of the 30 findings they have.

Findings co-occur through a few latent conditions, as in real abdominal CT populations:
age drives vascular calcification, osteopenia, renal cysts and prostatomegaly; chronic liver
disease brings steatosis, hepatomegaly, splenomegaly and ascites; malignancy brings metastases,
lymphadenopathy, ascites and effusions; fluid overload brings anasarca, effusions, ascites and
cardiomegaly; an acute abdomen brings obstruction, free air, appendicitis or bowel-wall edema.
About a fifth of patients are entirely normal. The marginal prevalences (2-30 % per finding)
are measured and written beside every corpus (``prevalence.csv``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Baseline probability per finding for an "ordinary" adult, before latent-condition multipliers.
BASE_RATE = {
    "submucosal_edema": 0.015,
    "renal_hypodensities": 0.12,
    "aortic_valve_calcification": 0.03,
    "coronary_calcification": 0.10,
    "thrombosis": 0.02,
    "metastatic_disease": 0.01,
    "pancreatic_atrophy": 0.03,
    "renal_cyst": 0.14,
    "osteopenia": 0.08,
    "surgically_absent_gallbladder": 0.10,
    "atelectasis": 0.16,
    "abdominal_aortic_aneurysm": 0.015,
    "anasarca": 0.01,
    "hiatal_hernia": 0.08,
    "lymphadenopathy": 0.03,
    "prostatomegaly": 0.10,
    "biliary_ductal_dilation": 0.04,
    "cardiomegaly": 0.03,
    "splenomegaly": 0.03,
    "hepatomegaly": 0.03,
    "atherosclerosis": 0.18,
    "ascites": 0.02,
    "pleural_effusion": 0.04,
    "hepatic_steatosis": 0.14,
    "appendicitis": 0.014,
    "gallstones": 0.09,
    "hydronephrosis": 0.05,
    "bowel_obstruction": 0.012,
    "free_air": 0.014,
    "fracture": 0.04,
}

# Multipliers applied when a latent condition is present.
CONDITIONS = {
    "liver_disease": (
        0.08,
        {
            "hepatic_steatosis": 3.0,
            "hepatomegaly": 8.0,
            "splenomegaly": 8.0,
            "ascites": 7.0,
            "thrombosis": 4.0,
            "submucosal_edema": 3.0,
            "biliary_ductal_dilation": 1.5,
        },
    ),
    "malignancy": (
        0.09,
        {
            "metastatic_disease": 60.0,
            "lymphadenopathy": 8.0,
            "ascites": 5.0,
            "pleural_effusion": 4.0,
            "thrombosis": 4.0,
            "biliary_ductal_dilation": 3.0,
            "hydronephrosis": 2.0,
            "fracture": 1.5,
        },
    ),
    "fluid_overload": (
        0.05,
        {
            "anasarca": 40.0,
            "pleural_effusion": 9.0,
            "ascites": 8.0,
            "cardiomegaly": 8.0,
            "atelectasis": 2.0,
            "submucosal_edema": 3.0,
        },
    ),
    "acute_abdomen": (
        0.07,
        {
            "bowel_obstruction": 25.0,
            "free_air": 14.0,
            "appendicitis": 20.0,
            "submucosal_edema": 8.0,
            "atelectasis": 1.5,
        },
    ),
}

# Findings whose probability rises with age (multiplier at 85 years relative to 55 years).
AGE_EFFECT = {
    "atherosclerosis": 3.0,
    "coronary_calcification": 3.5,
    "aortic_valve_calcification": 5.0,
    "abdominal_aortic_aneurysm": 5.0,
    "osteopenia": 4.0,
    "fracture": 3.0,
    "renal_cyst": 2.5,
    "renal_hypodensities": 1.8,
    "prostatomegaly": 3.0,
    "cardiomegaly": 2.5,
    "hiatal_hernia": 2.0,
    "pancreatic_atrophy": 3.0,
    "surgically_absent_gallbladder": 1.8,
    "gallstones": 1.5,
}

SEVERITIES = ("mild", "moderate", "severe")
LATERALISED = {"pleural_effusion", "atelectasis", "renal_cyst", "hydronephrosis", "renal_hypodensities"}


@dataclass
class FindingInstance:
    id: str
    severity: str = "moderate"
    side: str | None = None  # "left", "right", "bilateral" for paired organs
    reported: bool = True  # False: present in the image, not mentioned in the report (label -1)
    site: tuple[float, float, float] | None = None  # LPS mm, set by the phantom builder
    details: dict = field(default_factory=dict)


@dataclass
class Patient:
    index: int
    age: int
    sex: str  # "M" / "F"
    conditions: tuple[str, ...]
    findings: dict[str, FindingInstance]
    normal: bool
    position: str  # "HFS" or "FFS"
    body: dict[str, float]

    def has(self, finding_id: str) -> bool:
        return finding_id in self.findings


def _age(rng: np.random.Generator) -> int:
    return int(np.clip(round(18 + 74 * rng.beta(2.6, 2.0)), 18, 95))


def sample_patient(
    rng: np.random.Generator,
    index: int,
    normal_fraction: float = 0.12,
    ffs_fraction: float = 0.15,
    unreported_rate: float = 0.03,
) -> Patient:
    """Draw one patient. ``rng`` should be seeded per study so studies are order-independent."""
    age = _age(rng)
    sex = "M" if rng.random() < 0.5 else "F"
    body = {
        "half_width": float(rng.uniform(128, 172)),
        "half_depth": float(rng.uniform(92, 132)),
        "fat": float(rng.uniform(8, 34)),
        "length": float(rng.uniform(300, 350)),
        "organ_scale": float(rng.uniform(0.9, 1.1)),
        "jitter_x": float(rng.normal(0, 5)),
        "jitter_y": float(rng.normal(0, 5)),
        "contrast": float(rng.uniform(0.85, 1.15)),
        "bladder_fill": float(rng.uniform(0.5, 1.2)),
    }
    position = "FFS" if rng.random() < ffs_fraction else "HFS"
    normal = bool(rng.random() < normal_fraction)
    conditions = tuple(c for c, (p, _) in CONDITIONS.items() if rng.random() < p * (1.5 if age > 65 else 1.0))
    findings: dict[str, FindingInstance] = {}
    if not normal:
        age_t = (age - 55) / 30.0
        for fid, base in BASE_RATE.items():
            p = base
            if fid in AGE_EFFECT:
                p *= AGE_EFFECT[fid] ** age_t
            for c in conditions:
                p *= CONDITIONS[c][1].get(fid, 1.0)
            if fid == "prostatomegaly":
                p = p * 2.0 if sex == "M" else 0.0
            if fid == "osteopenia" and sex == "F":
                p *= 1.6
            if rng.random() < min(p, 0.9):
                findings[fid] = FindingInstance(fid)
        # Dependencies between findings.
        if "surgically_absent_gallbladder" in findings:
            findings.pop("gallstones", None)
        if "abdominal_aortic_aneurysm" in findings and rng.random() < 0.8:
            findings.setdefault("atherosclerosis", FindingInstance("atherosclerosis"))
        if "osteopenia" in findings and rng.random() < 0.2:
            findings.setdefault("fracture", FindingInstance("fracture"))
        if "pleural_effusion" in findings and rng.random() < 0.5:
            findings.setdefault("atelectasis", FindingInstance("atelectasis"))
        if "bowel_obstruction" in findings and rng.random() < 0.3:
            findings.setdefault("submucosal_edema", FindingInstance("submucosal_edema"))
    for fid, f in findings.items():
        f.severity = SEVERITIES[int(rng.choice(3, p=[0.45, 0.35, 0.20]))]
        if fid in LATERALISED:
            f.side = str(rng.choice(["left", "right", "bilateral"], p=[0.3, 0.3, 0.4]))
        # A few incidental findings go unmentioned (label -1 although visible), as in real reports.
        if fid in {"renal_hypodensities", "atherosclerosis", "atelectasis", "osteopenia", "renal_cyst"}:
            f.reported = bool(rng.random() >= unreported_rate * 3)
        else:
            f.reported = bool(rng.random() >= unreported_rate / 3)
    return Patient(index, age, sex, conditions, findings, normal, position, body)


def vary_anatomy(patient: Patient) -> None:
    """Corpus version 4: organ size, position and habitus spread as in patients, from the same draws (a
    deterministic widening about each range's centre, so patients, findings and reports stay those of every
    version): organ scale 0.9-1.1 -> 0.75-1.25; organ position sd 5 -> 15 mm; half-width 128-172 -> 110-190 mm,
    half-depth 92-132 -> 76-148 mm; subcutaneous fat 8-34 -> 3-42 mm."""
    b = patient.body
    b["organ_scale"] = 1.0 + 2.5 * (b["organ_scale"] - 1.0)
    b["jitter_x"], b["jitter_y"] = 3.0 * b["jitter_x"], 3.0 * b["jitter_y"]
    b["half_width"] = 150.0 + (40.0 / 22.0) * (b["half_width"] - 150.0)
    b["half_depth"] = 112.0 + 1.8 * (b["half_depth"] - 112.0)
    b["fat"] = max(3.0, 21.0 + 1.6 * (b["fat"] - 21.0))
