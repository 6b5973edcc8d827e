"""Does a site's wording work? Custom findings scored on a labelled corpus beside the findings they re-describe.

    python -m benchmarks.wording --package PKG --findings FILE --data DIR [--run RUN] \\
        --against enlarged_liver=hepatomegaly --against violin_in_pelvis=* --out results/custom-findings/wording.json

Each ``--against CUSTOM=FINDING`` compares the custom finding's margins with the catalogue finding's
labels (AUROC over the split's studies labelled 1 or 0), beside the catalogue finding's own AUROC; ``*``
compares it with every catalogue finding's labels (a nonsense finding should sit near 0.5 for all).
A package without a text encoder needs ``--run`` (the run it was exported from): the findings are then
baked into a copy first (``ct-zeroshot-train encode-prompts``). Volumes come from the training side's
cache (preprocessed with the package's spec).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def score(package_dir, findings, data, split, run=None, cache=None, progress=True) -> dict:
    from tqdm import tqdm

    from operators.contract.package import load_package
    from operators.contract.scoring import ZeroShotModel
    from training.cache import volume_cache
    from training.data import load_studies

    t0 = time.perf_counter()
    pkg = load_package(package_dir)
    with tempfile.TemporaryDirectory(prefix="wording-") as tmp:
        if pkg.text_encoder is None:
            if run is None:
                raise ValueError(f"{package_dir}: no text encoder; give --run (the run it was exported from)")
            from training.encode_prompts import encode_prompts

            pkg = encode_prompts(package_dir, findings, Path(tmp) / "pkg", run=run, log=lambda s: None)
            model = ZeroShotModel(pkg, device="cpu")
        else:
            model = ZeroShotModel(pkg, device="cpu", findings=findings)
        studies = [s for s in load_studies(data) if s.split == split and s.labels is not None]
        cache_ = volume_cache(model.package.spec, cache)
        margins = []
        for i in tqdm(range(0, len(studies), 16), desc="score", unit="batch", disable=not progress):
            batch = np.stack([cache_.get(s) for s in studies[i : i + 16]])
            margins += [f.margins for f in model.decide(model.embed_images(batch))]
    return {
        "ids": model.package.catalogue.ids,
        "margins": np.asarray(margins),
        "labels": np.stack([s.labels for s in studies]),
        "studies": len(studies),
        "seconds": time.perf_counter() - t0,
        "package": {"name": pkg.name, "version": pkg.version, "uid": pkg.uid},
    }


def compare(scored: dict, against: list[str]) -> list[dict]:
    from operators.contract.findings import load_catalogue
    from training.evaluate import finding_auroc

    catalogue = load_catalogue().ids
    ids, m, labels = scored["ids"], scored["margins"], scored["labels"]

    def auroc(col: int, target: str):
        j = catalogue.index(target)
        keep = labels[:, j] != -1
        return finding_auroc(labels[keep, j], m[keep, col])

    rows = []
    for pair in against:
        custom, _, target = pair.partition("=")
        if custom not in ids or (target != "*" and target not in catalogue):
            raise ValueError(f"--against {pair}: expected CUSTOM=FINDING with a custom id and a catalogue finding")
        col = ids.index(custom)
        if target == "*":
            values = [v for v in (auroc(col, t) for t in catalogue) if v is not None]
            rows.append(
                {
                    "custom": custom,
                    "against": "every catalogue finding",
                    "auroc_mean": float(np.mean(values)),
                    "auroc_min": float(min(values)),
                    "auroc_max": float(max(values)),
                    "max_distance_from_0.5": float(max(abs(v - 0.5) for v in values)),
                }
            )
        else:
            rows.append(
                {
                    "custom": custom,
                    "against": target,
                    "auroc_custom": auroc(col, target),
                    "auroc_catalogue": auroc(ids.index(target), target),
                    "positives": int((labels[:, catalogue.index(target)] == 1).sum()),
                }
            )
            r = rows[-1]
            r["difference"] = (
                None if None in (r["auroc_custom"], r["auroc_catalogue"]) else r["auroc_custom"] - r["auroc_catalogue"]
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--package", required=True)
    p.add_argument("--findings", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--run", help="for a package without a text encoder: the run it was exported from")
    p.add_argument("--against", action="append", required=True, help="CUSTOM=FINDING or CUSTOM=*")
    p.add_argument("--cache", help="preprocessed-volume cache (default: the training side's)")
    p.add_argument("--out", required=True, help="JSON file written")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    scored = score(args.package, args.findings, args.data, args.split, args.run, args.cache, not args.quiet)
    rows = compare(scored, args.against)
    result = {
        "command": "python -m benchmarks.wording " + " ".join(sys.argv[1:] if argv is None else argv),
        "package": scored["package"],
        "data": str(args.data),
        "split": args.split,
        "studies": scored["studies"],
        "seconds": round(scored["seconds"], 1),
        "comparisons": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for r in rows:
        print(json.dumps(r))
    print(f"{args.out}: {scored['studies']} {args.split} studies")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
