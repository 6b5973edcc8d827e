"""Benchmark: batch inference throughput (studies per hour) by worker count and engine, in one run.

``python -m benchmarks.bench_batch --out results/bench``: ``--studies`` synthetic
DICOM studies (tiny profile unless ``--profile full``), then ``ct-zeroshot infer`` over them with the
embedded demo model (or ``--model``) at each worker count, from scratch each time (``--force``).
Writes ``batch_throughput.json`` and ``batch_throughput.md``.

``--engines local,ray --workers 2 --reps 3`` compares the local process pool
with Ray actors on a local Ray cluster: the runs alternate between the engines, each configuration's
median of ``--reps`` is reported with the ratio to the first engine, and the Ray cluster's start-up
(``ray.init``) is timed apart, once, since a cluster is started once for many batches. Wall time
otherwise includes everything a batch does: scanning, worker start-up (model load), writing the summary.
Files: ``batch_throughput.*`` or, with several engines, ``batch_engines.*``.

``--models FLOAT,INT8 --devices cpu,openvino`` times every package on every device (a float package and
its ``ct-zeroshot-train quantize`` copy, say), alternating like the engines: ``batch_devices.*``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import bench_parser, synth_dicom
from operators.batch import run_batch


def main(argv=None) -> int:
    p = bench_parser("bench_batch", __doc__)
    p.add_argument("--studies", type=int, default=96)
    p.add_argument("--profile", default="tiny", choices=["tiny", "full"])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--engines", default="local", help="comma-separated engines: local, ray")
    p.add_argument("--reps", type=int, default=1, help="runs per configuration (the median is reported)")
    p.add_argument("--model", default=None)
    p.add_argument("--models", default=None, help="comma-separated packages, each timed (instead of --model)")
    p.add_argument("--devices", default="auto", help="comma-separated devices: auto, cpu, cuda, openvino")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    engines = args.engines.split(",")
    models = args.models.split(",") if args.models else [args.model]
    devices = args.devices.split(",")
    configs = [(e, w, m, d) for e in engines for w in counts for m in models for d in devices]
    times: dict[tuple, list[float]] = {c: [] for c in configs}
    oks: dict[tuple, int] = {}
    ray_start_s = None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_dicom(tmp, args.studies, args.profile, seed=11)
        if "ray" in engines:
            from operators import batch_ray

            t = time.perf_counter()
            batch_ray.start(None)
            ray_start_s = time.perf_counter() - t
            print(f"ray: local cluster up in {ray_start_s:.1f} s", flush=True)
        for rep in range(args.reps):
            for i, c in enumerate(configs):  # alternating, so drifts of the machine hit every configuration
                engine, w, model, device = c
                t = time.perf_counter()
                _, rows = run_batch(
                    tmp / "corpus" / "dicom", tmp / f"out-{i}", model, workers=w, force=True,
                    progress=False, engine=engine, device=device,
                )  # fmt: skip
                elapsed = time.perf_counter() - t
                times[c].append(elapsed)
                oks[c] = sum(r["status"] == "ok" for r in rows)
                print(f"rep {rep + 1}/{args.reps} {engine} x{w} {model or 'demo'} {device}: {oks[c]} ok in "
                      f"{elapsed:.1f} s", flush=True)  # fmt: skip
    results = {}
    for c in configs:
        engine, w, model, device = c
        med = statistics.median(times[c])
        key = f"{engine}-{w}" + (f"-{Path(model).name}-{device}" if len(models) * len(devices) > 1 else "")
        results[key] = {
            "engine": engine,
            "workers": w,
            "model": model or "demo",
            "device": device,
            "seconds_median": med,
            "seconds": times[c],
            "studies_ok": oks[c],
            "studies_per_hour": 3600 * oks[c] / med,
        }
    base = next(iter(results.values()))["studies_per_hour"]
    for r in results.values():
        r["ratio"] = r["studies_per_hour"] / base
    cmd = (
        f"python -m benchmarks.bench_batch --out {args.out} --studies {args.studies} --profile {args.profile} "
        f"--workers {args.workers}"
        + (f" --engines {args.engines}" if args.engines != "local" else "")
        + (f" --reps {args.reps}" if args.reps != 1 else "")
        + (f" --model {args.model}" if args.model else "")
        + (f" --models {args.models}" if args.models else "")
        + (f" --devices {args.devices}" if args.devices != "auto" else "")
    )
    doc = {
        "command": cmd,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "results": results,
        "ray_cluster_start_s": ray_start_s,
        "note": "each run processes every study from scratch (--force); wall time includes scanning, worker "
        "start-up (model load) and writing the summary; the Ray cluster's own start-up is timed apart",
    }
    name = (
        "batch_devices"
        if len(models) * len(devices) > 1
        else "batch_engines"
        if len(engines) > 1
        else "batch_throughput"
    )
    (out / f"{name}.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Batch throughput, {args.studies} synthetic {args.profile}-profile studies",
        "",
        f"`{cmd}` on {os.cpu_count()} CPU cores; median of {args.reps} run(s) per row.",
        "",
        "| engine | workers | model | device | seconds | studies/hour | ratio |",
        "|---|---:|---|---|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['engine']} | {r['workers']} | {r['model']} | {r['device']} | {r['seconds_median']:.1f} "
            f"| {r['studies_per_hour']:.0f} | {r['ratio']:.2f}x |"
        )
    if ray_start_s is not None:
        lines += ["", f"Ray's local cluster started in {ray_start_s:.1f} s (once; not in the rows above)."]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
