"""The pointing game: do a model package's localisation maps point at the lesion?

On a synthetic corpus written with lesion masks (``lesion_masks/<study>/<finding>.nii.gz``, the voxels that
show each present finding), for every study and every finding truly present in it (``ground_truth.jsonl``)
the finding's map is made exactly as the deploy side makes it (``operators.localisation``) on the volume's
grid, and scored against the mask:

- **hit**: the map's peak (the point the SR carries) lies inside the lesion;
- **mass**: the share of the map's positive mass over the body that lies inside the lesion;
- **random**: the lesion's share of the body's voxels (body: above -500 HU), which is both the hit rate of a
  point drawn uniformly in the body and the mass share of a flat map.

A finding counts as **focal** when its lesion covers, in the median study, under ``FOCAL_SHARE`` of the
body (organ enlargement or a diffuse change covers more); the macro figures are over focal findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from operators.contract.package import load_package
from operators.contract.preprocessing import model_input_affine, preprocess
from operators.contract.scoring import ZeroShotModel
from operators.contract.volume import load_nifti
from operators.localisation import coarse_maps, finding_map_on_volume

from .ground_truth import load_ground_truth

FOCAL_SHARE = 0.02  # a lesion under 2 % of the body's voxels in the median study: focal
BODY_HU = -500.0


class PointingError(ValueError):
    """The corpus or the package cannot be used for the pointing game."""


def _masks(data: Path, sid: str) -> dict[str, Path]:
    folder = data / "lesion_masks" / sid
    return {p.name[: -len(".nii.gz")]: p for p in sorted(folder.glob("*.nii.gz"))} if folder.is_dir() else {}


def masked_studies(data: Path, split: str | None, limit: int | None) -> tuple[dict, list[str]]:
    """The corpus's ground truth and its studies of ``split`` (None: all) with a finding present, at most
    ``limit``; refused without lesion masks or without such a study."""
    if not (data / "lesion_masks").is_dir():
        raise PointingError(f"{data}: no lesion_masks/ folder (a corpus written by synth without --no-masks)")
    truth = load_ground_truth(data)
    studies = [sid for sid, t in truth.items() if split is None or t.get("split") == split]
    studies = [sid for sid in studies if truth[sid].get("findings")][:limit]
    if not studies:
        raise PointingError(f"{data}: no study of split {split!r} with a finding present")
    return truth, studies


def present_masks(data: Path, sid: str, truth: dict, ids) -> dict[str, Path]:
    """Finding id -> lesion mask file, for the findings of ``ids`` truly present in study ``sid``."""
    return {fid: p for fid, p in _masks(data, sid).items() if fid in ids and fid in truth[sid]["findings"]}


def load_mask(path: Path, shape: tuple) -> np.ndarray:
    """A lesion mask as bool on the volume's grid; refused (naming the file) when its shape is not ``shape``."""
    mask = load_nifti(path).array > 0
    if mask.shape != tuple(shape):
        raise PointingError(f"{path}: mask shape {mask.shape} is not the volume's {tuple(shape)}")
    return mask


def pointing_game(
    package_dir: str | Path,
    data: str | Path,
    split: str | None = "test",
    limit: int | None = None,
    progress: bool = True,
) -> dict:
    """Per finding: studies, hit rate, mean mass share and mean random rate; macro over focal findings."""
    from tqdm import tqdm

    data = Path(data)
    truth, studies = masked_studies(data, split, limit)
    pkg = load_package(package_dir)
    model = ZeroShotModel(pkg, device="cpu", maps=True)
    ids = pkg.catalogue.ids
    rows: list[dict] = []
    for sid in tqdm(studies, desc="pointing", unit="study", disable=not progress):
        masks = present_masks(data, sid, truth, ids)
        if not masks:
            continue
        vol = load_nifti(data / "merlin_data" / f"{sid}.nii.gz")
        x = preprocess(vol, pkg.spec)
        _, loc = model.embed_images_with_maps(x[None])
        fids = sorted(masks)
        input_affine = model_input_affine(vol.array.shape, vol.affine, pkg.spec)
        coarse, grid = coarse_maps(loc[0], pkg, [ids.index(f) for f in fids], input_affine)
        body = vol.array > BODY_HU
        n_body = int(body.sum())
        for fid, m in zip(fids, coarse):
            lesion = load_mask(masks[fid], body.shape)
            inside = lesion & body
            if not inside.any():
                continue
            field, _, voxel = finding_map_on_volume(m, grid, vol.array.shape, vol.affine, fine=True)
            positive = np.clip(field, 0.0, None) * body
            total = float(positive.sum())
            rows.append(
                {
                    "study": sid,
                    "finding": fid,
                    "hit": bool(lesion[tuple(np.rint(voxel).astype(int))]),
                    "mass": float(positive[inside].sum()) / total if total > 0 else 0.0,
                    "random": int(inside.sum()) / n_body,
                }
            )
    return summarise(rows, pkg, data, split, len(studies))


def summarise(rows: list[dict], pkg, data: Path, split: str | None, studies: int) -> dict:
    per: dict[str, dict] = {}
    for fid in sorted({r["finding"] for r in rows}):
        sel = [r for r in rows if r["finding"] == fid]
        random = float(np.mean([r["random"] for r in sel]))
        per[fid] = {
            "n": len(sel),
            "hit_rate": float(np.mean([r["hit"] for r in sel])),
            "mass_share": float(np.mean([r["mass"] for r in sel])),
            "random_rate": random,
            "median_lesion_share": float(np.median([r["random"] for r in sel])),
            "focal": float(np.median([r["random"] for r in sel])) < FOCAL_SHARE,
        }
    focal = {k: v for k, v in per.items() if v["focal"]}

    def macro(key: str) -> float | None:
        return float(np.mean([v[key] for v in focal.values()])) if focal else None

    hit, mass, rnd = macro("hit_rate"), macro("mass_share"), macro("random_rate")
    return {
        "package": {"name": pkg.name, "version": pkg.version, "uid": pkg.uid, "root": str(pkg.root)},
        "data": str(data),
        "split": split,
        "studies": studies,
        "cases": len(rows),
        "focal_share": FOCAL_SHARE,
        "macro_focal": {
            "findings": len(focal),
            "hit_rate": hit,
            "mass_share": mass,
            "random_rate": rnd,
            "hit_over_random": (hit / rnd) if hit is not None and rnd else None,
            "mass_over_random": (mass / rnd) if mass is not None and rnd else None,
        },
        "per_finding": per,
        "rows": rows,  # every (study, finding) case: hit, mass, random
    }


def write_result(result: dict, out: str | Path, table: list[str]) -> Path:
    """``result`` as JSON at ``out`` and the markdown ``table`` (its lines) beside it (``.md``)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    return out


def write_pointing(result: dict, out: str | Path) -> Path:
    """The JSON and a markdown table beside it (``.md``)."""
    lines = [
        "| finding | focal | cases | hit rate | random point | mass in lesion | lesion share of body |",
        "|---|:---:|---:|---:|---:|---:|---:|",
    ]
    for fid, v in result["per_finding"].items():
        lines.append(
            f"| {fid} | {'yes' if v['focal'] else 'no'} | {v['n']} | {v['hit_rate']:.3f} | {v['random_rate']:.3f} | "
            f"{v['mass_share']:.3f} | {v['median_lesion_share']:.3f} |"
        )
    m = result["macro_focal"]
    if m["hit_rate"] is not None:
        lines.append(
            f"| **macro, {m['findings']} focal** | | {result['cases']} | **{m['hit_rate']:.3f}** | "
            f"**{m['random_rate']:.3f}** | **{m['mass_share']:.3f}** | |"
        )
    return write_result(result, out, lines)
