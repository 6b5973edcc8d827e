"""Diagnostic: is a finding's signal in the preprocessed voxels at all, and where?

``python -m benchmarks.voxel_signal --data data/synth-4k-v3 --out runs/diagnostics`` reads the
training split's preprocessed volumes (the preset's spec, from the volume cache) and, per finding, the
AUROC of every single voxel's value for the finding's label (studies labelled 1 against 0; the -1s,
findings the report does not mention, left out), with max(AUROC, 1 - AUROC) so that a darker voxel
counts as much as a brighter one. The best voxel says what a detector that knows *where* to look gets
from one voxel: high for a finding at a fixed place (a distended vein, an enlarged organ), low for one
whose place varies from study to study (a cyst anywhere in a kidney), which needs a detector that is
translation-invariant. Set beside the image tower's supervised probe (``ct-zeroshot-train probe``), it
separates "the voxels do not hold it" from "the tower does not keep it".

Writes ``voxel_signal.md`` and ``voxel_signal.json`` in ``--out``. Costs about 30 s and 3 GB per
finding on 2,456 volumes of 64x56x56 (exact ranks over the studies for every voxel).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import rankdata
from tqdm import tqdm

from benchmarks import bench_parser

FOCAL = (
    "renal_hypodensities",
    "renal_cyst",
    "thrombosis",
    "aortic_valve_calcification",
    "coronary_calcification",
    "free_air",
    "metastatic_disease",
    "lymphadenopathy",
    "fracture",
    "biliary_ductal_dilation",
    "hydronephrosis",
    "hepatomegaly",
)


def voxel_aurocs(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per column of ``x`` (studies x voxels), the AUROC of its values for ``y`` (1 / 0), by rank sums."""
    pos = y == 1
    n1, n0 = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(x, axis=0)  # ties get their mean rank: AUROC counts them as half
    u = ranks[pos].sum(0) - n1 * (n1 + 1) / 2
    return u / (n1 * n0)


def render(out: Path) -> str:
    """``voxel_signal.md`` from ``voxel_signal.json`` in ``out`` (written, and returned)."""
    d = json.loads((out / "voxel_signal.json").read_text())
    meta, rows = d["meta"], d["findings"]
    lines = [
        "# Single-voxel signal per finding",
        "",
        f"`{meta['command']}`: {meta['studies']} {meta['split']} studies of `{meta['data']}`, preprocessed "
        f"by `{meta['preset']}` ({'x'.join(map(str, meta['volume_shape']))} voxels, X Y Z), {meta['seconds']:.0f} s. "
        "Best voxel: max(AUROC, 1 - AUROC) of one voxel's value over the studies labelled 1 and 0; "
        "(darker) where positives are darker there.",
        "",
        "| finding | + / - | best single-voxel AUROC | at voxel (X, Y, Z) | voxels > 0.70 |",
        "|---|---:|---:|---|---:|",
    ]
    for r in sorted(rows, key=lambda r: r["best_voxel_auroc"]):
        side = " (brighter)" if r["brighter_in_positives"] else " (darker)"
        where = ",".join(map(str, r["best_voxel"])) + side
        lines.append(
            f"| {r['finding']} | {r['positives']} / {r['negatives']} | {r['best_voxel_auroc']:.3f} | {where} "
            f"| {r['voxels_over_0.70']} |"
        )
    text = "\n".join(lines) + "\n"
    (out / "voxel_signal.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = bench_parser("voxel_signal", __doc__)
    p.add_argument("--data", default="data/synth-4k-v3", help="corpus folder (default: data/synth-4k-v3)")
    p.add_argument("--preset", default="cpu-small", help="the training preset whose preprocessing is read")
    p.add_argument("--split", default="train")
    p.add_argument("--findings", default=",".join(FOCAL), help="comma-separated finding ids, or 'all'")
    p.add_argument("--render-only", action="store_true", help="rewrite voxel_signal.md from voxel_signal.json")
    args = p.parse_args(argv)
    out = Path("runs/diagnostics" if args.out == "results/bench" else args.out)
    if args.render_only:
        print(render(out))
        return 0

    from operators.contract.findings import load_catalogue
    from training.cache import split_volumes
    from training.config import TrainConfig

    ids = load_catalogue().ids
    wanted = ids if args.findings == "all" else [f.strip() for f in args.findings.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in ids]
    if unknown:
        p.error(f"unknown finding id(s): {', '.join(unknown)}")
    cfg = TrainConfig.load(args.preset)
    t0 = time.time()
    studies, volumes = split_volumes(cfg, args.data, args.split, labelled=True)
    shape = tuple(np.asarray(volumes[0]).shape)  # (C, X, Y, Z): the spec's BCXYZ
    x = np.stack([np.asarray(volumes[i], dtype=np.float32).ravel() for i in range(len(volumes))])
    labels = np.stack([s.labels for s in studies])
    rows = []
    for f in tqdm(wanted, desc="voxel AUROC", unit="finding"):
        y = labels[:, ids.index(f)]
        keep = y >= 0
        auc = voxel_aurocs(x[keep], y[keep])
        score = np.maximum(auc, 1 - auc)
        best = int(np.argmax(score))
        rows.append(
            {
                "finding": f,
                "positives": int((y == 1).sum()),
                "negatives": int((y == 0).sum()),
                "best_voxel_auroc": round(float(score[best]), 4),
                "brighter_in_positives": bool(auc[best] >= 0.5),
                "best_voxel": [int(i) for i in np.unravel_index(best, shape[-3:])],  # (X, Y, Z)
                "voxels_over_0.70": int((score > 0.70).sum()),
            }
        )
    meta = {
        "data": args.data,
        "split": args.split,
        "preset": args.preset,
        "studies": len(studies),
        "volume_shape": list(shape[-3:]),
        "seconds": round(time.time() - t0, 1),
        "command": " ".join(["python -m benchmarks.voxel_signal", *(sys.argv[1:] if argv is None else argv)]),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "voxel_signal.json").write_text(json.dumps({"meta": meta, "findings": rows}, indent=1) + "\n")
    print(render(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
