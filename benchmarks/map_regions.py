"""How large a present finding's map region is, and how well it covers the lesion, for each region fraction.

    python -m benchmarks.map_regions --package runs/recipe-s1/package --data data/synth-12k-v3 \\
        --split validation --studies 150 --out results/maps/region-fraction

A finding's SEG segment is the upper part of its map's range (``operators.localisation.map_region``: where
the map reaches a fraction of the way from its lowest value on the CT to its highest). The fraction sets what a
radiologist sees (half the abdomen, or the part around the peak) and what the SEG costs (one frame per slice
the region touches). It is a decision, so it is made on validation studies: for every finding truly present
in a study of ``--split`` with a lesion mask, its map is made as the deploy side makes it, and for each
fraction the region is scored against the mask:

- **voxels** and **slices**: the region's share of the volume's voxels and of its slices (the SEG's frames);
- **Dice** with the lesion, and **lesion covered**: the share of the lesion's voxels inside the region.

Writes OUT.json (every case) and OUT.md (medians and means per fraction, all findings and the focal ones).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

FRACTIONS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def region_scores(region: np.ndarray, lesion: np.ndarray) -> dict:
    """A region (bool, x y z, slices along z) against a lesion mask of the same grid."""
    both = int((region & lesion).sum())
    size, lesion_size = int(region.sum()), int(lesion.sum())
    return {
        "voxels": size / region.size,
        "slices": float(region.any(axis=(0, 1)).mean()),
        "dice": 2.0 * both / (size + lesion_size) if size + lesion_size else 0.0,
        "covered": both / lesion_size if lesion_size else 0.0,
    }


def measure(package: str | Path, data: str | Path, split: str, studies: int | None, progress: bool = True) -> dict:
    """Every (study, truly present finding) case's region scores at each of ``FRACTIONS``."""
    from tqdm import tqdm

    from operators.contract.package import load_package
    from operators.contract.preprocessing import model_input_affine, preprocess
    from operators.contract.scoring import ZeroShotModel
    from operators.contract.volume import load_nifti
    from operators.localisation import coarse_maps, finding_map_on_volume, map_region
    from training.pointing import BODY_HU, FOCAL_SHARE, load_mask, masked_studies, present_masks

    data = Path(data)
    truth, sids = masked_studies(data, split, studies)
    pkg = load_package(package)
    model = ZeroShotModel(pkg, device="cpu", maps=True)
    ids = pkg.catalogue.ids
    rows: list[dict] = []
    for sid in tqdm(sids, desc="map regions", unit="study", disable=not progress):
        masks = present_masks(data, sid, truth, ids)
        if not masks:
            continue
        vol = load_nifti(data / "merlin_data" / f"{sid}.nii.gz")
        fids = sorted(masks)
        _, loc = model.embed_images_with_maps(preprocess(vol, pkg.spec)[None])
        affine = model_input_affine(vol.array.shape, vol.affine, pkg.spec)
        coarse, grid = coarse_maps(loc[0], pkg, [ids.index(f) for f in fids], affine)
        body = vol.array > BODY_HU
        for n, fid in enumerate(fids):
            lesion = load_mask(masks[fid], body.shape)
            if not lesion.any():
                continue
            field, _, _ = finding_map_on_volume(coarse[n], grid, vol.array.shape, vol.affine, fine=True)
            rows.append(
                {
                    "study": sid,
                    "finding": fid,
                    "lesion_share": float((lesion & body).sum() / max(1, body.sum())),
                    "by_fraction": {str(f): region_scores(map_region(field, f), lesion) for f in FRACTIONS},
                }
            )
    lesion_share: dict[str, list[float]] = {}
    for r in rows:
        lesion_share.setdefault(r["finding"], []).append(r["lesion_share"])
    focal = {f for f, v in lesion_share.items() if float(np.median(v)) < FOCAL_SHARE}
    summary = {}
    for f in FRACTIONS:
        for name, sel in (("all", rows), ("focal", [r for r in rows if r["finding"] in focal])):
            s = [r["by_fraction"][str(f)] for r in sel]
            summary[f"{f}/{name}"] = {
                "cases": len(s),
                "median_voxels": float(np.median([x["voxels"] for x in s])) if s else None,
                "median_slices": float(np.median([x["slices"] for x in s])) if s else None,
                "mean_dice": float(np.mean([x["dice"] for x in s])) if s else None,
                "mean_covered": float(np.mean([x["covered"] for x in s])) if s else None,
            }
    return {
        "package": {"name": pkg.name, "version": pkg.version, "root": str(pkg.root)},
        "data": str(data),
        "split": split,
        "studies": len(sids),
        "fractions": list(FRACTIONS),
        "focal_findings": sorted(focal),
        "summary": summary,
        "rows": rows,
    }


def table(result: dict, command: str) -> list[str]:
    lines = [
        f"# Map regions by region fraction: {result['package']['name']} {result['package']['version']}",
        "",
        f"`{command}`: {len(result['rows'])} cases (a finding truly present, with its lesion mask) in "
        f"{result['studies']} {result['split']} studies of `{result['data']}`.",
        "",
        "| fraction | findings | cases | median voxels | median slices | mean Dice | mean lesion covered |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for key, v in result["summary"].items():
        f, name = key.split("/")
        if not v["cases"]:
            continue
        lines.append(
            f"| {f} | {name} | {v['cases']} | {v['median_voxels']:.1%} | {v['median_slices']:.1%} | "
            f"{v['mean_dice']:.3f} | {v['mean_covered']:.3f} |"
        )
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package", required=True, help="a model package with the localisation output")
    p.add_argument("--data", required=True, help="a synthetic corpus written with lesion masks")
    p.add_argument("--split", default="validation", help="the split to measure on (default validation)")
    p.add_argument("--studies", type=int, default=150, help="at most this many studies with a finding present")
    p.add_argument("--out", required=True, help="OUT.json and OUT.md are written")
    args = p.parse_args(argv)
    result = measure(args.package, args.data, args.split, args.studies)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    command = (
        f"python -m benchmarks.map_regions --package {args.package} --data {args.data} --split {args.split} "
        f"--studies {args.studies} --out {args.out}"
    )
    out.with_suffix(".md").write_text("\n".join(table(result, command)) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
