"""Benchmark: batch inference throughput (studies per hour) at 1 and 2 workers, in one run.

``python -m benchmarks.bench_batch --out results/bench`` (``make bench-batch``): ``--studies`` synthetic
DICOM studies (tiny profile unless ``--profile full``), then ``ct-zeroshot infer`` over them with the
embedded demo model (or ``--model``) at each worker count, from scratch each time (``--force``).
Writes ``batch_throughput.json`` and ``batch_throughput.md``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

from benchmarks import bench_parser
from operators.batch import run_batch
from training.synth.corpus import SynthConfig, generate_corpus


def main(argv=None) -> int:
    p = bench_parser("bench_batch", __doc__)
    p.add_argument("--studies", type=int, default=96)
    p.add_argument("--profile", default="tiny", choices=["tiny", "full"])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--model", default=None)
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"generating {args.studies} {args.profile} studies with DICOM ...", flush=True)
        generate_corpus(
            SynthConfig(
                out=str(tmp / "corpus"),
                studies=args.studies,
                seed=11,
                profile=args.profile,
                dicom=True,
                workers=os.cpu_count() or 1,
            ),
            progress=True,
        )
        for w in counts:
            t = time.perf_counter()
            code, rows = run_batch(tmp / "corpus" / "dicom", tmp / f"out{w}", args.model, workers=w, force=True)
            elapsed = time.perf_counter() - t
            ok = sum(r["status"] == "ok" for r in rows)
            results[w] = {"seconds": elapsed, "studies_ok": ok, "studies_per_hour": 3600 * ok / elapsed}
            print(
                f"{w} worker(s): {ok} studies in {elapsed:.1f} s = {results[w]['studies_per_hour']:.0f}/h", flush=True
            )
    base = results[counts[0]]["studies_per_hour"]
    for r in results.values():
        r["speedup"] = r["studies_per_hour"] / base
    cmd = (
        f"python -m benchmarks.bench_batch --out {args.out} --studies {args.studies} --profile {args.profile} "
        f"--workers {args.workers}" + (f" --model {args.model}" if args.model else "")
    )
    doc = {
        "command": cmd,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "results": results,
        "note": "each worker count processes every study from scratch (--force); wall time includes "
        "scanning, worker start-up (model load) and writing the summary",
    }
    (out / "batch_throughput.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Batch throughput, {args.studies} synthetic {args.profile}-profile studies",
        "",
        f"`{cmd}` on {os.cpu_count()} CPU cores.",
        "",
        "| workers | seconds | studies/hour | speed-up |",
        "|---:|---:|---:|---:|",
    ]
    for w, r in results.items():
        lines.append(f"| {w} | {r['seconds']:.1f} | {r['studies_per_hour']:.0f} | {r['speedup']:.2f}x |")
    (out / "batch_throughput.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
