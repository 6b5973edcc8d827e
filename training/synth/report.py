"""Radiology reports in Merlin's style, and the 1 / 0 / -1 labels that go with them.

"FINDINGS:" is followed by organ-system sections ("Header: text.") whose headers vary in
spelling between reports (all spellings are ones ``training.reports`` maps to Merlin's 13
systems), then a numbered "IMPRESSION:". Present findings are described with severity and
laterality in varied phrasing; some absent findings are explicitly negated ("No
hydronephrosis."); quiet sections get a normal statement ("Unremarkable."). Labels follow the
text, as Merlin's do: 1 where the report states the finding, 0 where it negates it, -1 where it
does not mention it.
"""

from __future__ import annotations

import numpy as np

from operators.findings import SECTIONS, load_catalogue

from .patient import Patient

HEADERS = {
    "lower thorax": ["Lower thorax", "LOWER THORAX", "Lung bases", "Lower chest"],
    "liver": ["Liver and biliary tree", "Liver", "LIVER AND BILIARY TREE", "Liver/biliary tree"],
    "gallbladder": ["Gallbladder", "Gall bladder", "GALLBLADDER"],
    "spleen": ["Spleen", "SPLEEN"],
    "pancreas": ["Pancreas", "PANCREAS"],
    "adrenal glands": ["Adrenal glands", "Adrenals", "ADRENAL GLANDS"],
    "kidneys": ["Kidneys and ureters", "Kidneys", "GU", "KIDNEYS AND URETERS"],
    "bowel": ["Gastrointestinal tract", "GI tract", "Bowel", "Bowel/mesentery"],
    "peritoneum": ["Peritoneal space", "Peritoneal cavity", "Peritoneum"],
    "abdominal wall": ["Abdominal wall"],
    "pelvic": ["Pelvic organs", "Pelvis"],
    "circulatory": ["Vasculature", "Vessels", "VASCULATURE"],
    "lymph nodes": ["Lymph nodes", "Lymphatics", "LYMPH NODES"],
    "musculoskeletal": ["Musculoskeletal", "Bones", "Osseous structures", "MUSCULOSKELETAL"],
}
PELVIC_SPLIT = {"M": ["Bladder", "Prostate and seminal vesicles"], "F": ["Bladder", "Uterus and ovaries"]}
# Merlin's 13 organ systems in report order, with the abdominal wall written after the peritoneum.
_AFTER_PERITONEUM = SECTIONS.index("peritoneum") + 1
ORDER = [*SECTIONS[:_AFTER_PERITONEUM], "abdominal wall", *SECTIONS[_AFTER_PERITONEUM:]]
NORMAL_STATEMENTS = ["Normal.", "Unremarkable.", "Within normal limits.", "Normal in appearance.", "Normal."]

# Where each finding's sentence goes (the section of its text, not always its catalogue section).
REPORT_SECTION = {
    "aortic_valve_calcification": "lower thorax",
    "coronary_calcification": "lower thorax",
    "cardiomegaly": "lower thorax",
    "atelectasis": "lower thorax",
    "pleural_effusion": "lower thorax",
    "hiatal_hernia": "lower thorax",
    "hepatic_steatosis": "liver",
    "hepatomegaly": "liver",
    "biliary_ductal_dilation": "liver",
    "metastatic_disease": "liver",
    "gallstones": "gallbladder",
    "surgically_absent_gallbladder": "gallbladder",
    "splenomegaly": "spleen",
    "pancreatic_atrophy": "pancreas",
    "renal_cyst": "kidneys",
    "renal_hypodensities": "kidneys",
    "hydronephrosis": "kidneys",
    "bowel_obstruction": "bowel",
    "submucosal_edema": "bowel",
    "appendicitis": "bowel",
    "ascites": "peritoneum",
    "free_air": "peritoneum",
    "anasarca": "abdominal wall",
    "prostatomegaly": "pelvic",
    "thrombosis": "circulatory",
    "abdominal_aortic_aneurysm": "circulatory",
    "atherosclerosis": "circulatory",
    "lymphadenopathy": "lymph nodes",
    "osteopenia": "musculoskeletal",
    "fracture": "musculoskeletal",
}

SIZE = {"mild": "small", "moderate": "moderate", "severe": "large"}

# {sev}: mild/moderate/severe; {size}: small/moderate/large; {side}: left/right/bilateral.
POSITIVE = {
    "submucosal_edema": [
        "{Sev} diffuse submucosal edema of the colon.",
        "There is submucosal edema of the colonic wall.",
        "Colonic wall thickening with {sev} submucosal edema.",
    ],
    "renal_hypodensities": [
        "Subcentimeter hypodensities in the {side} kidney, too small to characterize.",
        "Multiple {side} renal hypodensities.",
        "Small hypodensities in the {side} kidney.",
    ],
    "aortic_valve_calcification": ["Aortic valve calcification.", "{Sev} aortic valvular calcification."],
    "coronary_calcification": [
        "{Sev} coronary calcification.",
        "Coronary artery calcifications are present.",
        "There is {sev} coronary artery calcification.",
    ],
    "thrombosis": [
        "There is thrombosis with a filling defect in the vessel.",
        "Partial thrombosis is present.",
        "Filling defect consistent with venous thrombosis.",
    ],
    "metastatic_disease": [
        "Multiple hypodense hepatic lesions, consistent with metastatic disease.",
        "Innumerable liver lesions concerning for metastatic disease.",
    ],
    "pancreatic_atrophy": ["{Sev} pancreatic parenchymal atrophy.", "The pancreas is atrophic."],
    "renal_cyst": [
        "{Size} {side} renal cyst.",
        "Simple cyst in the {side} kidney measuring up to {mm} mm.",
        "{Side} renal cyst.",
    ],
    "osteopenia": ["{Sev} diffuse osteopenia.", "Osteopenia.", "Diffuse osteopenia of the visualized bones."],
    "surgically_absent_gallbladder": [
        "Surgically absent.",
        "Status post cholecystectomy.",
        "The gallbladder is surgically absent.",
    ],
    "atelectasis": [
        "{Side} lower lobe atelectasis.",
        "{Sev} bibasilar atelectasis.",
        "Dependent atelectasis at the {side} lung base.",
    ],
    "abdominal_aortic_aneurysm": [
        "Infrarenal abdominal aortic aneurysm measuring {mm} mm.",
        "Abdominal aortic aneurysm with mural thrombus, maximal diameter {mm} mm.",
    ],
    "anasarca": ["Anasarca.", "Diffuse subcutaneous edema compatible with anasarca."],
    "hiatal_hernia": ["{Size} hiatal hernia.", "There is a {size} sliding hiatal hernia."],
    "lymphadenopathy": [
        "Retroperitoneal lymphadenopathy, largest node {mm} mm.",
        "Mesenteric and retroperitoneal lymphadenopathy.",
        "Enlarged lymph nodes consistent with lymphadenopathy.",
    ],
    "prostatomegaly": ["{Sev} prostatomegaly.", "The prostate is enlarged."],
    "biliary_ductal_dilation": [
        "{Sev} intrahepatic and extrahepatic biliary ductal dilation.",
        "{Sev} biliary ductal dilation.",
    ],
    "cardiomegaly": ["{Sev} cardiomegaly.", "The heart is enlarged."],
    "splenomegaly": ["{Sev} splenomegaly.", "The spleen is enlarged, measuring {mm} mm craniocaudally."],
    "hepatomegaly": ["{Sev} hepatomegaly.", "The liver is enlarged."],
    "atherosclerosis": [
        "{Sev} atherosclerosis of the aorta and iliac arteries.",
        "Atherosclerotic calcifications of the aorta.",
        "{Sev} atherosclerosis.",
    ],
    "ascites": ["{Size} volume ascites.", "There is {size} volume ascites throughout the abdomen and pelvis."],
    "pleural_effusion": ["{Size} {side} pleural effusion.", "{Side} pleural effusion."],
    "hepatic_steatosis": [
        "{Sev} hepatic steatosis.",
        "Diffusely decreased hepatic attenuation consistent with {sev} steatosis.",
    ],
    "appendicitis": [
        "The appendix is dilated to {mm} mm with periappendiceal fat stranding, consistent with acute appendicitis.",
        "Findings consistent with acute appendicitis.",
    ],
    "gallstones": [
        "Gallstones present without evidence of cholecystitis.",
        "Cholelithiasis.",
        "Multiple dense gallstones in the gallbladder.",
    ],
    "hydronephrosis": ["{Sev} {side} hydronephrosis.", "{Side} hydronephrosis and hydroureter."],
    "bowel_obstruction": [
        "Dilated fluid-filled small bowel loops with air-fluid levels, compatible with small bowel obstruction.",
        "{Sev} small bowel obstruction.",
    ],
    "free_air": ["There is free air in the anterior abdomen.", "Foci of free intraperitoneal air."],
    "fracture": [
        "Compression fracture of a lower thoracic vertebral body with {pct}% height loss.",
        "Vertebral compression fracture.",
    ],
}

NEGATIVE = {
    "submucosal_edema": ["No bowel wall thickening or submucosal edema."],
    "renal_hypodensities": ["No focal renal lesions."],
    "aortic_valve_calcification": ["No aortic valve calcification."],
    "coronary_calcification": ["No coronary calcification."],
    "thrombosis": ["No portal venous thrombosis.", "No evidence of venous thrombosis."],
    "metastatic_disease": ["No evidence of metastatic disease.", "No suspicious hepatic lesions."],
    "pancreatic_atrophy": ["No pancreatic atrophy."],
    "renal_cyst": ["No renal cysts."],
    "osteopenia": ["Normal bone mineralization."],
    "surgically_absent_gallbladder": ["The gallbladder is present."],
    "atelectasis": ["No atelectasis."],
    "abdominal_aortic_aneurysm": ["No abdominal aortic aneurysm.", "The abdominal aorta is normal in caliber."],
    "anasarca": ["No anasarca."],
    "hiatal_hernia": ["No hiatal hernia."],
    "lymphadenopathy": ["No lymphadenopathy.", "No enlarged lymph nodes."],
    "prostatomegaly": ["No prostatomegaly.", "The prostate is normal in size."],
    "biliary_ductal_dilation": [
        "No biliary ductal dilation.",
        "No intrahepatic or extrahepatic biliary ductal dilation.",
    ],
    "cardiomegaly": ["No cardiomegaly.", "The heart is normal in size."],
    "splenomegaly": ["No splenomegaly.", "The spleen is normal in size."],
    "hepatomegaly": ["No hepatomegaly.", "The liver is normal in size."],
    "atherosclerosis": ["No significant atherosclerosis."],
    "ascites": ["No ascites.", "No free fluid."],
    "pleural_effusion": ["No pleural effusion.", "No pleural effusions."],
    "hepatic_steatosis": ["No hepatic steatosis.", "Normal hepatic attenuation."],
    "appendicitis": ["Normal appendix.", "No evidence of appendicitis."],
    "gallstones": ["No gallstones.", "No radiopaque gallstones."],
    "hydronephrosis": ["No hydronephrosis.", "No hydronephrosis or hydroureter."],
    "bowel_obstruction": ["No bowel obstruction.", "No evidence of bowel obstruction."],
    "free_air": ["No free air.", "No free intraperitoneal air."],
    "fracture": ["No acute fracture.", "No fracture."],
}

# Extra, label-neutral sentences that real reports carry.
FILLER = {
    "liver": ["Patent portal and hepatic veins."],
    "kidneys": ["Symmetric enhancement."],
    "bowel": ["Normal caliber bowel loops."],
    "circulatory": ["Patent major vessels."],
    "musculoskeletal": ["Degenerative changes of the lumbar spine."],
    "adrenal glands": ["No adrenal nodules."],
}

# Order of the impression: acute findings first.
IMPRESSION_ORDER = [
    "free_air",
    "bowel_obstruction",
    "appendicitis",
    "thrombosis",
    "metastatic_disease",
    "abdominal_aortic_aneurysm",
    "hydronephrosis",
    "biliary_ductal_dilation",
    "ascites",
    "fracture",
    "submucosal_edema",
    "pleural_effusion",
    "lymphadenopathy",
    "splenomegaly",
    "hepatomegaly",
    "cardiomegaly",
    "anasarca",
    "hepatic_steatosis",
    "gallstones",
    "pancreatic_atrophy",
    "hiatal_hernia",
    "prostatomegaly",
    "renal_cyst",
    "osteopenia",
    "atelectasis",
    "coronary_calcification",
    "aortic_valve_calcification",
    "atherosclerosis",
    "renal_hypodensities",
    "surgically_absent_gallbladder",
]


def _fill(template: str, f, rng: np.random.Generator) -> str:
    sev, side = f.severity, f.side or "bilateral"
    mm = {"mild": rng.integers(12, 25), "moderate": rng.integers(25, 40), "severe": rng.integers(40, 65)}[sev]
    text = template.format(
        sev=sev,
        Sev=sev.capitalize(),
        size=SIZE[sev],
        Size=SIZE[sev].capitalize(),
        side=side,
        Side=side.capitalize(),
        mm=int(mm),
        pct={"mild": 35, "moderate": 50, "severe": 65}[sev],
    )
    return text[0].upper() + text[1:]


def write_report(
    patient: Patient,
    rng: np.random.Generator,
    negation_rate: float = 0.45,
    quiet_rate: float = 0.5,
    omit_section_rate: float = 0.04,
) -> tuple[str, dict[str, int]]:
    """Return (findings text, labels {finding id: 1 / 0 / -1}) for ``patient``."""
    ids = load_catalogue().ids
    labels = {fid: -1 for fid in ids}
    body: dict[str, list[str]] = {s: [] for s in ORDER}
    for fid, f in patient.findings.items():
        if not f.reported:
            continue
        body[REPORT_SECTION[fid]].append(_fill(str(rng.choice(POSITIVE[fid])), f, rng))
        labels[fid] = 1
    # Sections without positives are either a bare normal statement ("Unremarkable.") or a list of
    # negations; only the latter set 0 labels.
    quiet = {sec for sec in ORDER if not body[sec] and rng.random() < quiet_rate}
    negated: list[str] = []
    for fid in ids:
        if fid in patient.findings or REPORT_SECTION[fid] in quiet:
            continue
        if fid == "prostatomegaly" and patient.sex == "F":
            continue
        if fid == "gallstones" and "surgically_absent_gallbladder" in patient.findings:
            continue
        if rng.random() < negation_rate:
            negated.append(fid)
    rng.shuffle(negated)
    for fid in negated:
        if fid == "metastatic_disease" and rng.random() < 0.5:
            continue  # said in the impression instead, below
        body[REPORT_SECTION[fid]].append(str(rng.choice(NEGATIVE[fid])))
        labels[fid] = 0
    parts = ["FINDINGS:"]
    for sec in ORDER:
        sentences = body[sec]
        if not sentences and sec in ("abdominal wall",) and rng.random() < 0.6:
            continue
        if not sentences and rng.random() < omit_section_rate:
            continue  # a missing section, as happens in real reports
        if not sentences:
            sentences = [str(rng.choice(NORMAL_STATEMENTS))]
            if sec in FILLER and rng.random() < 0.15:
                sentences = [str(rng.choice(FILLER[sec]))]
        elif sec in FILLER and rng.random() < 0.2:
            sentences.append(str(rng.choice(FILLER[sec])))
        if sec == "pelvic" and rng.random() < 0.5:
            b_hdr, o_hdr = PELVIC_SPLIT[patient.sex]
            organ = [s for s in sentences if "prostat" in s.lower()]
            rest = [s for s in sentences if s not in organ] or ["Unremarkable."]
            parts.append(f"{b_hdr}: {' '.join(rest)}")
            parts.append(f"{o_hdr}: {' '.join(organ) if organ else str(rng.choice(NORMAL_STATEMENTS))}")
            continue
        parts.append(f"{rng.choice(HEADERS[sec])}: {' '.join(sentences)}")
    impression = []
    for fid in IMPRESSION_ORDER:
        f = patient.findings.get(fid)
        if f is not None and f.reported and len(impression) < 5:
            impression.append(_fill(str(rng.choice(POSITIVE[fid])), f, rng))
    if "metastatic_disease" in negated and labels["metastatic_disease"] == -1:
        impression.append("No evidence of metastatic disease.")
        labels["metastatic_disease"] = 0
    if not impression:
        impression = [
            str(
                rng.choice(
                    ["No acute abnormality in the abdomen or pelvis.", "No acute intra-abdominal or pelvic process."]
                )
            )
        ]
    parts.append("IMPRESSION: " + " ".join(f"{i}. {s}" for i, s in enumerate(impression, 1)))
    sep = "\n" if rng.random() < 0.5 else " "
    return sep.join(parts), labels
