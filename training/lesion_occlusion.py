"""Lesion-site occlusion: does a model package's score for a finding come from the lesion?

On a synthetic corpus written with lesion masks (``lesion_masks/<study>/<finding>.nii.gz``), for every study
and every focal finding truly present in it (``ground_truth.jsonl``), the study is scored three times by the
package exactly as the deploy side scores it (``preprocess`` then the image encoder):

- **original**: the volume as written;
- **lesion hidden**: the lesion's voxels (grown by one voxel) filled with the median of the tissue around it
  (a shell 1 to 3 voxels out, inside the body), so the lesion's contrast is gone and the organ stays;
- **control**: the same shape moved elsewhere in the same tissue (a random shift whose voxels all lie in the
  body, touch no lesion of the study and read, for ``TISSUE_SHARE`` of them, within ``TISSUE_HU`` of the
  lesion's surroundings, so in practice the same organ) and filled the same way.

A model that reads the lesion loses score when the lesion is hidden and keeps it when the same volume of the
same tissue is hidden elsewhere: the per-case difference (control score minus lesion-hidden score, in
percentage points of the finding's probability) is the lesion effect, with a t-interval over the cases. A
model that reads an "abnormal patient" axis (age, other findings) loses as little either way.

A finding is **focal** as in the pointing game (``training.pointing.FOCAL_SHARE``: the lesion covers under 2 %
of the body in the median study); larger findings (an enlarged organ, ascites) cannot be moved elsewhere and
are left out. A case where no control site is found in ``TRIES`` shifts is counted and left out.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage, stats

from operators.contract.package import load_package
from operators.contract.preprocessing import preprocess
from operators.contract.scoring import ZeroShotModel
from operators.contract.volume import Volume, load_nifti

from .pointing import BODY_HU, FOCAL_SHARE, load_mask, masked_studies, present_masks, write_result

TISSUE_HU = 40.0  # a control voxel reads within this of the lesion's surrounding tissue (the same organ)
TISSUE_SHARE = 0.9  # ... for at least this share of its voxels
TRIES = 400  # random shifts tried for a control site
GROW = 1  # voxels the hidden region extends past the lesion (its blurred edge)
SHELL = 3  # voxels out to which the surrounding tissue is read


def _fill_value(hu: np.ndarray, region: np.ndarray, body: np.ndarray) -> float | None:
    """The median HU of the tissue just outside ``region`` (inside the body); None when there is none."""
    shell = ndimage.binary_dilation(region, iterations=SHELL) & ~region & body
    return float(np.median(hu[shell])) if shell.any() else None


def _control_site(
    tissue: np.ndarray, region: np.ndarray, body: np.ndarray, avoid: np.ndarray, fill: float, rng: np.random.Generator
) -> np.ndarray | None:
    """``region`` shifted to where every voxel lies in the body and outside ``avoid``, and ``TISSUE_SHARE`` of
    them read within ``TISSUE_HU`` of ``fill`` in ``tissue`` (the volume, its noise filtered out); None when
    ``TRIES`` random shifts find no such place."""
    idx = np.argwhere(region)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    shape = np.array(tissue.shape)
    near = np.maximum(hi - lo + 1, 4) * 3  # half the shifts stay near the lesion, where its organ is
    for t in range(TRIES):
        low, high = -lo, shape - hi  # the shifts that keep the region inside the volume
        if t % 2 == 0:
            low, high = np.maximum(low, -near), np.minimum(high, near + 1)
        shift = np.array([rng.integers(int(low[d]), int(high[d])) for d in range(3)])
        if not shift.any():
            continue
        at = tuple((idx + shift).T)
        if avoid[at].any() or not body[at].all():
            continue
        if np.mean(np.abs(tissue[at] - fill) <= TISSUE_HU) >= TISSUE_SHARE:
            site = np.zeros_like(region)
            site[at] = True
            return site
    return None


def _hidden(hu: np.ndarray, region: np.ndarray, fill: float) -> np.ndarray:
    out = hu.copy()
    out[region] = fill
    return out


def lesion_occlusion(
    package_dir: str | Path,
    data: str | Path,
    split: str | None = "test",
    limit: int | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Per focal finding: cases, scores original / lesion hidden / control, the lesion effect and its
    interval, decisions kept; macro over focal findings."""
    from tqdm import tqdm

    data = Path(data)
    truth, studies = masked_studies(data, split, limit)
    pkg = load_package(package_dir)
    model = ZeroShotModel(pkg, device="cpu")
    ids = pkg.catalogue.ids
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    no_site: dict[str, int] = {}
    for sid in tqdm(studies, desc="lesion occlusion", unit="study", disable=not progress):
        masks = present_masks(data, sid, truth, ids)
        if not masks:
            continue
        vol = load_nifti(data / "merlin_data" / f"{sid}.nii.gz")
        hu = vol.array.astype(np.float32)
        body = hu > BODY_HU
        n_body = int(body.sum())
        lesions = {}
        for fid, path in masks.items():
            lesion = load_mask(path, hu.shape)
            if (lesion & body).any():
                lesions[fid] = lesion & body
        if not lesions:
            continue
        avoid = ndimage.binary_dilation(np.any(list(lesions.values()), axis=0), iterations=GROW + 1)
        tissue = ndimage.median_filter(hu, size=2)  # the tissue, not its noise: where a control site may go
        variants, cases = [hu], []
        for fid in sorted(lesions):
            share = int(lesions[fid].sum()) / n_body
            if share >= FOCAL_SHARE:
                continue  # not focal in this study: an organ-scale change has no "elsewhere"
            region = ndimage.binary_dilation(lesions[fid], iterations=GROW) & body
            fill = _fill_value(hu, region, body)
            site = None if fill is None else _control_site(tissue, region, body, avoid, fill, rng)
            control_fill = None if site is None else _fill_value(hu, site, body)
            if fill is None or site is None or control_fill is None:
                no_site[fid] = no_site.get(fid, 0) + 1
                continue
            variants += [_hidden(hu, region, fill), _hidden(hu, site, control_fill)]
            cases.append((fid, share, len(variants) - 2))
        if not cases:
            continue
        batch = np.stack([preprocess(Volume(v, vol.affine), pkg.spec) for v in variants])
        scored = model.decide(model.embed_images(batch))
        for fid, share, k in cases:
            j = ids.index(fid)
            rows.append(
                {
                    "study": sid,
                    "finding": fid,
                    "lesion_share": share,
                    "p": float(scored[0].probabilities[j]),
                    "p_lesion_hidden": float(scored[k].probabilities[j]),
                    "p_control": float(scored[k + 1].probabilities[j]),
                    "called": bool(scored[0].present[j]),
                    "called_lesion_hidden": bool(scored[k].present[j]),
                    "called_control": bool(scored[k + 1].present[j]),
                }
            )
    return summarise(rows, no_site, pkg, data, split, len(studies), seed)


def _interval(diffs: np.ndarray) -> tuple[float, float]:
    if len(diffs) < 2:
        return (float("nan"), float("nan"))
    half = stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs))
    return (float(diffs.mean() - half), float(diffs.mean() + half))


def summarise(rows: list[dict], no_site: dict, pkg, data: Path, split: str | None, studies: int, seed: int) -> dict:
    per: dict[str, dict] = {}
    for fid in sorted({r["finding"] for r in rows} | set(no_site)):
        sel = [r for r in rows if r["finding"] == fid]
        if not sel:
            per[fid] = {"n": 0, "no_control_site": no_site.get(fid, 0)}
            continue
        p = np.array([r["p"] for r in sel]) * 100
        hid = np.array([r["p_lesion_hidden"] for r in sel]) * 100
        ctl = np.array([r["p_control"] for r in sel]) * 100
        effect = ctl - hid
        called = [r for r in sel if r["called"]]
        per[fid] = {
            "n": len(sel),
            "no_control_site": no_site.get(fid, 0),
            "median_lesion_share": float(np.median([r["lesion_share"] for r in sel])),
            "score": float(p.mean()),
            "drop_lesion_hidden": float((p - hid).mean()),
            "drop_control": float((p - ctl).mean()),
            "lesion_effect": float(effect.mean()),
            "lesion_effect_ci95": _interval(effect),
            "called": len(called),
            "kept_lesion_hidden": (float(np.mean([r["called_lesion_hidden"] for r in called])) if called else None),
            "kept_control": float(np.mean([r["called_control"] for r in called])) if called else None,
        }
    scored = {k: v for k, v in per.items() if v["n"]}
    resolved = [k for k, v in scored.items() if v["lesion_effect_ci95"][0] > 0]

    def macro(key: str) -> float | None:
        return float(np.mean([v[key] for v in scored.values()])) if scored else None

    return {
        "package": {"name": pkg.name, "version": pkg.version, "uid": pkg.uid, "root": str(pkg.root)},
        "data": str(data),
        "split": split,
        "studies": studies,
        "seed": seed,
        "cases": len(rows),
        "focal_share": FOCAL_SHARE,
        "tissue_hu": TISSUE_HU,
        "macro_focal": {
            "findings": len(scored),
            **{k: macro(k) for k in ("drop_lesion_hidden", "drop_control", "lesion_effect")},
            "effect_above_zero": resolved,
        },
        "per_finding": per,
        "rows": rows,
    }


def write_lesion_occlusion(result: dict, out: str | Path) -> Path:
    """The JSON and a markdown table beside it (``.md``); scores in percentage points of probability."""
    lines = [
        "| finding | cases | no control site | score | drop, lesion hidden | drop, control | lesion effect [95 % CI] "
        "| called present | still called, lesion hidden | still called, control |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for fid, v in result["per_finding"].items():
        if not v["n"]:
            lines.append(f"| {fid} | 0 | {v['no_control_site']} | | | | | | | |")
            continue
        lo, hi = v["lesion_effect_ci95"]
        kept = [
            "" if v[k] is None else f"{v[k]:.2f}" for k in ("kept_lesion_hidden", "kept_control")
        ]  # shares of the cases called present
        lines.append(
            f"| {fid} | {v['n']} | {v['no_control_site']} | {v['score']:.1f} | {v['drop_lesion_hidden']:+.2f} | "
            f"{v['drop_control']:+.2f} | {v['lesion_effect']:+.2f} [{lo:+.2f}, {hi:+.2f}] | {v['called']} | "
            f"{kept[0]} | {kept[1]} |"
        )
    m = result["macro_focal"]
    if m["lesion_effect"] is not None:
        lines.append(
            f"| **macro, {m['findings']} focal** | {result['cases']} | | | **{m['drop_lesion_hidden']:+.2f}** | "
            f"**{m['drop_control']:+.2f}** | **{m['lesion_effect']:+.2f}** | | | |"
        )
    return write_result(result, out, lines)
