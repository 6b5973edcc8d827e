"""Benchmark: memory per study on the deploy side, the figure a site sizes its container's limit with.

``python -m benchmarks.bench_memory --out results/bench``: ``--studies`` synthetic DICOM studies of
the ``full`` profile (unless ``--profile tiny``), then ``ct-zeroshot infer`` over them with the embedded
demo model (or ``--model``) at each worker count of ``--workers``, each in its own process tree, sampled
every 50 ms with psutil: the peak resident memory of the largest single process (a worker: it holds
the model and one study at a time, as the listener's pipeline does) and of the whole tree together.
Writes ``memory_per_study.json`` and ``memory_per_study.md``.

Sampling can miss a peak shorter than the interval, so the figures are lower bounds of the true peak;
a limit should keep a margin above them (the docs name one).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import bench_parser, synth_dicom


def peak_rss(cmd: list[str], interval: float = 0.05) -> tuple[int, float, float]:
    """Run ``cmd``; return its exit status, the peak RSS (MiB) of its largest process and of its
    whole process tree, sampled every ``interval`` seconds."""
    import psutil

    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    largest = total = 0
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        rss = []
        for p in tree:
            try:
                rss.append(p.memory_info().rss)
            except psutil.NoSuchProcess:
                continue
        if rss:
            largest, total = max(largest, max(rss)), max(total, sum(rss))
        time.sleep(interval)
    _, err = proc.communicate()
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
    return proc.returncode, largest / 2**20, total / 2**20


def lengthen(series: Path, n: int) -> None:
    """Rewrite a one-series folder as ``n`` slices: its slices in order, repeated, placed along the table at
    the series' own spacing, each with a new SOP Instance UID (the study and series keep theirs)."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    files = sorted(series.glob("*.dcm"))
    slices = sorted((pydicom.dcmread(f) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    z0 = float(slices[0].ImagePositionPatient[2])
    step = float(slices[1].ImagePositionPatient[2]) - z0
    for f in files:
        f.unlink()
    for i in range(n):
        ds = slices[i % len(slices)]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [*map(float, ds.ImagePositionPatient[:2]), z0 + i * step]
        ds.InstanceNumber = i + 1
        ds.SliceLocation = float(np.float32(z0 + i * step))
        ds.save_as(series / f"{i:04d}.dcm")


def main(argv=None) -> int:
    p = bench_parser("bench_memory", __doc__)
    p.add_argument("--studies", type=int, default=4)
    p.add_argument("--profile", default="full", choices=["tiny", "full"])
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--model", default=None)
    p.add_argument(
        "--slices", type=int, default=0,
        help="lengthen every study's series to this many slices (its slices repeated along the table at its "
        "spacing, new UIDs), e.g. 300 for a 512x512x300 study; 0 keeps the profile's",
    )  # fmt: skip
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = [int(w) for w in args.workers.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synth_dicom(tmp, args.studies, args.profile, seed=12)
        import pydicom

        if args.slices:
            for series in sorted({f.parent for f in (tmp / "corpus" / "dicom").rglob("*.dcm")}):
                lengthen(series, args.slices)
        first = next((tmp / "corpus" / "dicom").rglob("*.dcm"))
        ds = pydicom.dcmread(first, stop_before_pixels=True)
        n_slices = len(list(first.parent.glob("*.dcm")))
        shape = f"{ds.Rows}x{ds.Columns}x{n_slices}"
        for w in counts:
            cli = "import sys; from operators.cli import main; sys.exit(main())"
            cmd = [sys.executable, "-c", cli, "infer", str(tmp / "corpus" / "dicom"), "--out", str(tmp / f"out-{w}"),
                   "--workers", str(w), "--quiet"]  # fmt: skip
            if args.model:
                cmd += ["--model", args.model]
            t = time.perf_counter()
            rc, largest, total = peak_rss(cmd)
            elapsed = time.perf_counter() - t
            summary = json.loads((tmp / f"out-{w}" / "summary.json").read_text()) if rc == 0 else {}
            ok = sum(r.get("status") == "ok" for r in summary.get("studies", []))
            print(f"workers {w}: exit {rc}, {ok} ok, largest process {largest:.0f} MiB, tree {total:.0f} MiB")
            rows.append({"workers": w, "exit": rc, "studies_ok": ok, "largest_process_mib": round(largest),
                         "tree_mib": round(total), "seconds": round(elapsed, 1)})  # fmt: skip
    cmd = f"python -m benchmarks.bench_memory --out {args.out} --studies {args.studies} --profile {args.profile} "
    cmd += f"--workers {args.workers}" + (f" --model {args.model}" if args.model else "")
    cmd += f" --slices {args.slices}" if args.slices else ""
    doc = {
        "command": cmd,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "study_shape": shape,
        "model": args.model or "embedded demo model",
        "results": rows,
        "note": "peak resident memory sampled every 50 ms (a lower bound of the true peak)",
    }
    (out / "memory_per_study.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# Memory per study, {args.studies} synthetic {args.profile}-profile studies ({shape})",
        "",
        f"`{cmd}`; {doc['model']}; peak resident memory sampled every 50 ms.",
        "",
        "| workers | studies ok | largest process (MiB) | whole tree (MiB) | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workers']} | {r['studies_ok']} | {r['largest_process_mib']} | {r['tree_mib']} | {r['seconds']} |"
        )
    (out / "memory_per_study.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["exit"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
