"""The pointing game: do a model package's localisation maps point at the lesion?

On a synthetic corpus written with lesion masks (``lesion_masks/<study>/<finding>.nii.gz``, the voxels that
show each present finding), for every study and every finding truly present in it (``ground_truth.jsonl``)
the finding's map is made exactly as the deploy side makes it (``operators.localisation``) on the volume's
grid, and scored against the mask:

- **hit**: the map's peak (the point the SR carries) lies inside the lesion;
- **mass**: the share of the map's positive mass over the body that lies inside the lesion;
- **random**: the lesion's share of the body's voxels (body: above -500 HU), which is both the hit rate of a
  point drawn uniformly in the body and the mass share of a flat map.

``method="occlusion"`` plays the game with the model-agnostic check instead of the package's maps: the peak is
the place whose occlusion lowers the finding's margin most (``occlusion_peaks``: patches of the model input
replaced by a blurred copy of it, coarse to fine), for any package, with or without the localisation output.
It needs several hundred image-encoder passes per study, so it is a check, not the deploy path; it gives a
peak, not a map, so its cases have no mass share.

A finding counts as **focal** when its lesion covers, in the median study, under ``FOCAL_SHARE`` of the
body (organ enlargement or a diffuse change covers more); the macro figures are over focal findings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from operators.contract.package import load_package
from operators.contract.preprocessing import model_input_affine, preprocess
from operators.contract.scoring import ZeroShotModel, finding_scores
from operators.contract.volume import load_nifti
from operators.localisation import coarse_maps, finding_map_on_volume

from .ground_truth import load_ground_truth

FOCAL_SHARE = 0.02  # a lesion under 2 % of the body's voxels in the median study: focal
BODY_HU = -500.0
METHODS = ("features", "occlusion")
# occlusion search, coarse to fine: (patch, stride) in model-input voxels; each finer level searches the
# previous level's best patch (and half a finer patch around it)
OCCLUSION_LEVELS = ((16, 8), (8, 4), (4, 2))
OCCLUSION_BATCH = 16


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


def _corners(lo: int, hi: int, patch: int, stride: int, size: int) -> list[int]:
    """Patch starts from ``lo`` to ``hi`` every ``stride``, kept inside ``[0, size - patch]`` (deduplicated)."""
    top = max(size - patch, 0)
    return sorted({min(max(c, 0), top) for c in range(lo, hi + 1, stride)} | {min(max(hi, 0), top)})


def package_margins(model: ZeroShotModel):
    """(B,1,X,Y,Z) model inputs -> (B, findings) margins, by the deploy side's rule (``finding_scores``)."""
    pkg = model.package
    return lambda batch: finding_scores(model.embed_images(batch), pkg.prompt_embeddings, pkg.rows, pkg.logit_scale)[0]


def occlusion_peaks(margins, x: np.ndarray, findings: list[int]) -> dict[int, np.ndarray]:
    """Finding index -> the model-input voxel (float, the centre of a patch) whose occlusion lowers the
    finding's margin most. ``margins`` scores a (B,1,X,Y,Z) batch ((B, findings); ``package_margins``);
    ``x`` is one preprocessed (1,X,Y,Z) volume. A patch is occluded by replacing it with
    the volume blurred at half the patch's width (its contrast gone, its mean kept). The first level tiles
    the whole input and is shared by the findings; each finer level tiles the best patch of the one before."""
    shape = x.shape[1:]
    fills = {p: ndimage.gaussian_filter(x[0], sigma=p / 2.0) for p, _ in OCCLUSION_LEVELS}

    base = margins(x[None])[0]

    seen: dict[tuple, np.ndarray] = {}  # findings whose searches meet share the passes

    def drops(patch: int, starts: list[tuple[int, int, int]]) -> np.ndarray:
        key = (patch, tuple(starts))
        if key not in seen:
            seen[key] = _drops(patch, starts)
        return seen[key]

    def _drops(patch: int, starts: list[tuple[int, int, int]]) -> np.ndarray:
        out = []
        for b in range(0, len(starts), OCCLUSION_BATCH):
            batch = np.repeat(x[None], len(starts[b : b + OCCLUSION_BATCH]), axis=0)
            for k, c in enumerate(starts[b : b + OCCLUSION_BATCH]):
                sl = tuple(slice(c[a], c[a] + patch) for a in range(3))
                batch[k, 0][sl] = fills[patch][sl]
            out.append(base - margins(batch))
        return np.concatenate(out)  # (starts, findings)

    def grid(patch: int, stride: int, lo: np.ndarray, hi: np.ndarray) -> list[tuple[int, int, int]]:
        axes = [_corners(int(lo[a]), int(hi[a]), patch, stride, shape[a]) for a in range(3)]
        return [(i, j, k) for i in axes[0] for j in axes[1] for k in axes[2]]

    top, top_stride = OCCLUSION_LEVELS[0]
    starts = grid(top, top_stride, np.zeros(3, int), np.array(shape) - top)
    first = drops(top, starts)
    peaks = {}
    for j in findings:
        best, prev = np.array(starts[int(np.argmax(first[:, j]))]), top
        for patch, stride in OCCLUSION_LEVELS[1:]:
            cand = grid(patch, stride, best - patch // 2, best + prev - patch + patch // 2)
            d = drops(patch, cand)
            best, prev = np.array(cand[int(np.argmax(d[:, j]))]), patch
        peaks[j] = best + (prev - 1) / 2.0
    return peaks


def pointing_game(
    package_dir: str | Path,
    data: str | Path,
    split: str | None = "test",
    limit: int | None = None,
    progress: bool = True,
    method: str = "features",
) -> dict:
    """Per finding: studies, hit rate, mean mass share and mean random rate; macro over focal findings.
    ``method``: the package's localisation maps (``features``) or the occlusion search (``occlusion``)."""
    from tqdm import tqdm

    if method not in METHODS:
        raise PointingError(f"unknown method {method!r}: one of {', '.join(METHODS)}")
    data = Path(data)
    truth, studies = masked_studies(data, split, limit)
    pkg = load_package(package_dir)
    model = ZeroShotModel(pkg, device="cpu", maps=method == "features")
    ids = pkg.catalogue.ids
    rows: list[dict] = []
    for sid in tqdm(studies, desc=f"pointing ({method})", unit="study", disable=not progress):
        masks = present_masks(data, sid, truth, ids)
        if not masks:
            continue
        vol = load_nifti(data / "merlin_data" / f"{sid}.nii.gz")
        x = preprocess(vol, pkg.spec)
        fids = sorted(masks)
        input_affine = model_input_affine(vol.array.shape, vol.affine, pkg.spec)
        if method == "features":
            _, loc = model.embed_images_with_maps(x[None])
            coarse, grid = coarse_maps(loc[0], pkg, [ids.index(f) for f in fids], input_affine)
        else:
            peaks = occlusion_peaks(package_margins(model), x, [ids.index(f) for f in fids])
            to_voxel = np.linalg.solve(np.asarray(vol.affine, dtype=np.float64), input_affine)
        body = vol.array > BODY_HU
        n_body = int(body.sum())
        for n, fid in enumerate(fids):
            lesion = load_mask(masks[fid], body.shape)
            inside = lesion & body
            if not inside.any():
                continue
            mass: float | None = None
            if method == "features":
                field, _, voxel = finding_map_on_volume(coarse[n], grid, vol.array.shape, vol.affine, fine=True)
                positive = np.clip(field, 0.0, None) * body
                total = float(positive.sum())
                mass = float(positive[inside].sum()) / total if total > 0 else 0.0
            else:
                voxel = (to_voxel @ np.append(peaks[ids.index(fid)], 1.0))[:3]
            at = np.clip(np.rint(voxel).astype(int), 0, np.array(body.shape) - 1)
            rows.append(
                {
                    "study": sid,
                    "finding": fid,
                    "hit": bool(lesion[tuple(at)]),
                    "mass": mass,
                    "random": int(inside.sum()) / n_body,
                }
            )
    result = summarise(rows, pkg, data, split, len(studies))
    result["method"] = method
    return result


def summarise(rows: list[dict], pkg, data: Path, split: str | None, studies: int) -> dict:
    per: dict[str, dict] = {}
    for fid in sorted({r["finding"] for r in rows}):
        sel = [r for r in rows if r["finding"] == fid]
        random = float(np.mean([r["random"] for r in sel]))
        per[fid] = {
            "n": len(sel),
            "hit_rate": float(np.mean([r["hit"] for r in sel])),
            "mass_share": None if any(r["mass"] is None for r in sel) else float(np.mean([r["mass"] for r in sel])),
            "random_rate": random,
            "median_lesion_share": float(np.median([r["random"] for r in sel])),
            "focal": float(np.median([r["random"] for r in sel])) < FOCAL_SHARE,
        }
    focal = {k: v for k, v in per.items() if v["focal"]}

    def macro(key: str) -> float | None:
        values = [v[key] for v in focal.values()]
        return float(np.mean(values)) if values and None not in values else None

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
    """The JSON and a markdown table beside it (``.md``); an occlusion result has no mass share ("-")."""

    def f3(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        "| finding | focal | cases | hit rate | random point | mass in lesion | lesion share of body |",
        "|---|:---:|---:|---:|---:|---:|---:|",
    ]
    for fid, v in result["per_finding"].items():
        lines.append(
            f"| {fid} | {'yes' if v['focal'] else 'no'} | {v['n']} | {v['hit_rate']:.3f} | {v['random_rate']:.3f} | "
            f"{f3(v['mass_share'])} | {v['median_lesion_share']:.3f} |"
        )
    m = result["macro_focal"]
    if m["hit_rate"] is not None:
        lines.append(
            f"| **macro, {m['findings']} focal** | | {result['cases']} | **{m['hit_rate']:.3f}** | "
            f"**{m['random_rate']:.3f}** | **{f3(m['mass_share'])}** | |"
        )
    return write_result(result, out, lines)
