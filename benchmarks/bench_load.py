"""Benchmark: the listener under load, by its ``workers`` setting, in one run (``make bench-load``).

``python -m benchmarks.bench_load --out results/bench``: ``--studies`` synthetic DICOM studies
(``--profile full`` by default: 512x512 slices, as a clinical abdominal CT's) are sent by
``--senders`` concurrent senders (pynetdicom, one association per study, the studies dealt round-robin)
to ``ct-zeroshot serve`` running the embedded demo model (or ``--model``); its SRs go to a C-STORE SCP
in this process, which notes when each study's SR arrives. For each ``--workers`` count, a fresh
listener and spool:

- studies per hour: the studies whose SR arrived over the time from the first instance sent to the
  last SR received;
- latency: from the acknowledgement of a study's last instance to its SR's arrival (p50, p95); it
  includes the listener's completion wait (``idle_timeout_s``, 2 s here) and the queue;
- the listener's peak resident memory (``VmHWM``), and per-stage seconds from its ``/metrics``.

Then, unless ``--no-backlog``, the same studies already complete in a fresh listener's spool when it
starts (``ready/``, as after an outage): processing alone, from the start of its workers to the last SR,
without receiving.

Writes ``load.json`` and ``load.md``; the ratio column is throughput against the first row of its table.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import yaml

from benchmarks import bench_parser, synth_dicom


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Destination:
    """A C-STORE SCP (pynetdicom) standing for the PACS: when each study's SR arrived."""

    def __init__(self):
        from pynetdicom import AE, evt
        from pynetdicom.presentation import StoragePresentationContexts

        self.arrived: dict[str, float] = {}
        self.lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.supported_contexts = StoragePresentationContexts  # 120 of the 128 an AE may hold
        ae.add_supported_context("1.2.840.10008.1.1")  # Verification: the listener's /readyz C-ECHOes it
        self.port = _free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event):
        ds = event.dataset
        if ds.get("Modality") == "SR":
            with self.lock:
                self.arrived.setdefault(str(ds.StudyInstanceUID), time.time())
        return 0x0000

    def stop(self):
        self.server.shutdown()


def _send(title: str, port: int, studies: list[list[Path]], last: dict[str, float], errors: list[str]) -> None:
    """One sender: each study in one association, its instances in order; ``last`` notes when the study's
    last instance was acknowledged."""
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=title)
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    for files in studies:
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        assoc = ae.associate("127.0.0.1", port, ae_title="CTZEROSHOT")
        if not assoc.is_established:
            errors.append(f"{title}: association refused for study {uid}")
            continue
        try:
            for f in files:
                status = assoc.send_c_store(f)
                if getattr(status, "Status", None) != 0x0000:
                    errors.append(f"{title}: {f.name} not stored ({getattr(status, 'Status', None)})")
            last[uid] = time.time()
        finally:
            assoc.release()


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.read()
    except OSError:
        return None


def _stage_seconds(metrics: bytes) -> dict[str, float]:
    """Mean seconds per study of each pipeline stage, from the listener's Prometheus text."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.decode()):
        if family.name != "ctzs_stage_seconds":
            continue
        for s in family.samples:
            if s.name.endswith("_sum"):
                sums[s.labels["stage"]] = s.value
            elif s.name.endswith("_count"):
                counts[s.labels["stage"]] = s.value
    return {k: sums[k] / counts[k] for k in sums if counts.get(k)}


def _queue_backlog(spool: Path, studies: list[list[Path]]) -> None:
    """The studies as a listener's spool holds complete studies waiting for a worker (``ready/<study>/``):
    what it finds after an outage, and queues at start."""
    import shutil

    for files in studies:
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        folder = spool / "ready" / uid
        folder.mkdir(parents=True)
        for f in files:
            sop = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
            shutil.copyfile(f, folder / f"{sop}.dcm")


def _started(log: Path) -> float | None:
    """When the listener's threads started (its "listening as" log line), as a Unix time."""
    from datetime import datetime

    for line in log.read_text().splitlines():
        if "listening as" in line:
            return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def run_one(
    workers: int, studies: list[list[Path]], senders: int, model: str | None, tmp: Path, backlog: bool = False
) -> dict:
    """One listener with ``workers``: the studies sent by ``senders`` concurrent senders, or (``backlog``)
    already complete in its spool when it starts, processed from the queue (no receiving)."""
    dest = Destination()
    port, hport = _free_port(), _free_port()
    titles = [f"SEND{i + 1}" for i in range(senders)]
    cfg = {
        "ae_title": "CTZEROSHOT",
        "port": port,
        "allowed": [{"ae_title": t, "host": "127.0.0.1"} for t in titles],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": dest.port},
        "spool": str(tmp / f"spool-{workers}{'-backlog' if backlog else ''}"),
        "idle_timeout_s": 2.0,
        "workers": workers,
        "health": {"bind": "127.0.0.1", "port": hport},
        **({"model": model} if model else {}),
    }
    name = f"listener-{workers}{'-backlog' if backlog else ''}"
    if backlog:
        _queue_backlog(Path(cfg["spool"]), studies)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    log = open(tmp / f"{name}.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "operators.cli", "serve", "--config", str(path)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.time() + 300
        while _get(f"http://127.0.0.1:{hport}/readyz") is None:
            if proc.poll() is not None or time.time() > deadline:
                why = (tmp / f"{name}.log").read_text()[-1500:]
                raise RuntimeError(f"the listener did not become ready (/readyz):\n{why}")
            time.sleep(0.5)
        last: dict[str, float] = {}
        errors: list[str] = []
        shares = [studies[i::senders] for i in range(senders)] if not backlog else []
        t0 = time.time()
        threads = [threading.Thread(target=_send, args=(t, port, s, last, errors)) for t, s in zip(titles, shares)]
        for t in threads:
            t.start()
        n = len(studies)
        shown = -1
        while time.time() - t0 < 3600:
            done = len(dest.arrived)
            if done != shown:
                sent = "in the spool" if backlog else f"{len(last)}/{n} studies sent"
                print(f"  workers {workers}: {sent}, {done}/{n} SRs back", flush=True)
                shown = done
            if done >= n or (errors and not any(t.is_alive() for t in threads) and done >= len(last)):
                break
            time.sleep(1)
        for t in threads:
            t.join()
        metrics = _get(f"http://127.0.0.1:{hport}/metrics") or b""
        status = Path(f"/proc/{proc.pid}/status")
        peak_mb = None
        if status.is_file():
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak_mb = int(line.split()[1]) / 1024
    finally:
        proc.terminate()
        proc.wait(60)
        log.close()
        dest.stop()
    if backlog:  # from the start of the listener's workers: processing alone
        t0 = _started(tmp / f"{name}.log") or t0
    latencies = sorted(dest.arrived[u] - last[u] for u in dest.arrived if u in last)
    span = max(dest.arrived.values()) - t0 if dest.arrived else float("nan")
    q = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    return {
        "workers": workers,
        "mode": "backlog" if backlog else "senders",
        "studies_sent": len(studies) if backlog else len(last),
        "srs_received": len(dest.arrived),
        "errors": errors,
        "seconds": span,
        "studies_per_hour": 3600 * len(dest.arrived) / span,
        "latency_p50_s": statistics.median(latencies) if latencies else None,
        "latency_p95_s": q[18],
        "peak_rss_mb": peak_mb,
        "stage_mean_s": _stage_seconds(metrics),
    }


def main(argv=None) -> int:
    p = bench_parser("bench_load", __doc__)
    p.add_argument("--studies", type=int, default=20)
    p.add_argument("--senders", type=int, default=3)
    p.add_argument("--workers", default=f"1,{os.cpu_count() or 1}", help="comma-separated listener worker counts")
    p.add_argument("--profile", default="full", choices=["tiny", "full"])
    p.add_argument("--model", default=None, help="model package (default: the embedded demo model)")
    p.add_argument("--no-backlog", action="store_true", help="skip the backlog runs (studies queued in the spool)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = list(dict.fromkeys(int(w) for w in args.workers.split(",")))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dicom = synth_dicom(tmp, args.studies, args.profile, seed=13)
        studies = [sorted(d.rglob("*.dcm")) for d in sorted(dicom.iterdir()) if d.is_dir()]
        slices = statistics.median(len(s) for s in studies)
        first = pydicom.dcmread(studies[0][0], stop_before_pixels=True)
        size = f"{first.Rows}x{first.Columns}"
        for w in counts:
            print(f"listener with workers {w}, {args.senders} senders:", flush=True)
            runs.append(run_one(w, studies, args.senders, args.model, tmp))
        backlog = []
        if not args.no_backlog:
            for w in counts:
                print(f"listener with workers {w}, the studies queued in its spool:", flush=True)
                backlog.append(run_one(w, studies, args.senders, args.model, tmp, backlog=True))
    for group in (runs, backlog):
        for r in group:
            r["ratio"] = r["studies_per_hour"] / group[0]["studies_per_hour"]
    cmd = (
        f"python -m benchmarks.bench_load --out {args.out} --studies {args.studies} --senders {args.senders} "
        f"--workers {args.workers} --profile {args.profile}"
        + (f" --model {args.model}" if args.model else "")
        + (" --no-backlog" if args.no_backlog else "")
    )
    doc = {
        "command": cmd,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "studies": args.studies,
        "median_slices": slices,
        "slice_size": size,
        "senders": args.senders,
        "idle_timeout_s": 2.0,
        "runs": runs,
        "backlog": backlog,
    }
    (out / "load.json").write_text(json.dumps(doc, indent=1))
    lines = [
        f"# The listener under load: {args.studies} {args.profile}-profile studies (median {slices:.0f} slices of "
        f"{size}), {args.senders} concurrent senders",
        "",
        f"`{cmd}` on {os.cpu_count()} CPU cores. Latency: last instance acknowledged -> SR at the destination "
        "(it includes the 2 s completion wait).",
        "",
        "| workers | SRs | studies/hour | ratio | latency p50 (s) | latency p95 (s) | peak memory (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['workers']} | {r['srs_received']}/{args.studies} | {r['studies_per_hour']:.0f} | {r['ratio']:.2f}x "
            f"| {r['latency_p50_s']:.1f} | {r['latency_p95_s']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    if backlog:
        lines += [
            "",
            "The same studies already complete in the listener's spool when it starts (a backlog after an outage):",
            "processing alone, from the start of its workers to the last SR.",
            "",
            "| workers | SRs | studies/hour | ratio | seconds | peak memory (MB) |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in backlog:
            lines.append(
                f"| {r['workers']} | {r['srs_received']}/{args.studies} | {r['studies_per_hour']:.0f} | "
                f"{r['ratio']:.2f}x | {r['seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
    stages = sorted({k for r in runs for k in r["stage_mean_s"]})
    if stages:
        lines += ["", "Mean seconds per study by stage (the listener's /metrics):", ""]
        lines += ["| workers | " + " | ".join(stages) + " |", "|---:|" + "---:|" * len(stages)]
        for r in runs:
            lines.append(
                f"| {r['workers']} | " + " | ".join(f"{r['stage_mean_s'].get(k, 0):.2f}" for k in stages) + " |"
            )
    (out / "load.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["srs_received"] == args.studies and not r["errors"] for r in runs + backlog) else 1


if __name__ == "__main__":
    raise SystemExit(main())
