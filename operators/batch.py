"""``ct-zeroshot infer``: batch inference over a folder tree of DICOM studies.

- Files are grouped by Study and Series Instance UID, whatever the folder layout.
- Each study runs the application's stages (``operators.pipeline``) in a worker process; with N workers
  N studies are decoded, preprocessed and encoded at once, so the stages overlap across studies.
- SRs go to ``OUT/sr/`` (written atomically); the table of results to ``OUT/summary.csv`` and
  ``OUT/summary.json`` (study, series used, status, error, per-finding raw score, certainty and decision),
  written when the batch ends, via temporary files, so a summary on disk is always a finished one.
- Resumable: a study whose SR is already in ``OUT/sr/`` is skipped unless ``--force``: its earlier
  summary row is kept, or rebuilt from the SR when the earlier run ended before its summary. An SR
  is this model's only when its SOP Instance UID is the one this package derives (model UID and
  weights' digest); SRs of another model are refused without ``--force``, never mixed into a summary.
- One run at a time per ``OUT`` (a lock file); a second gets a clear error.
- One failed study never stops the rest; the exit status is 1 when any failed (they are listed at the
  end), 0 otherwise.
"""

from __future__ import annotations

import csv
import json
import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from pathlib import Path

from .contract.dicom_series import CT_IMAGE_STORAGE, CT_STORAGE_CLASSES, SeriesFiles, scan_files, scan_tree
from .contract.files import PARTIAL_SUFFIX, write_atomic
from .contract.package import load_package, named_or_demo
from .contract.phi import allow_identifiers, describe, identifiers_allowed
from .pipeline import SeriesToModelInput, StudyWork, run_study, seg_filename, sr_filename

log = logging.getLogger("ct-zeroshot")

NOT_ASSESSED = "not assessed"  # the decision column of a finding the package cannot assess
_WORKER: dict = {}


def _init_worker(
    package_dir: str,
    out_dir: str,
    threads: int,
    level: int,
    findings,
    findings_mode: str,
    maps: bool | None = False,
    stow=None,
    device: str = "auto",
) -> None:
    import torch

    from .contract.scoring import ZeroShotModel

    torch.set_num_threads(threads)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    allow_identifiers(identifiers_allowed())  # the parent's setting, through the environment
    pkg = load_package(package_dir)  # verified in every process that loads it (the files could change)
    model = ZeroShotModel(
        pkg, device=device, threads=threads, findings=findings, findings_mode=findings_mode, maps=maps
    )
    _WORKER.update(model=model, prep=SeriesToModelInput(pkg.spec), out=Path(out_dir), stow=stow)


def _process(study_uid: str, paths: list[str]) -> dict:
    """One study in a worker. Only file paths cross the process boundary: the headers are re-read here, in
    parallel, rather than pickled and unpickled through the parent (2-worker speed-up 1.63x -> 1.71x)."""
    series: list[SeriesFiles] = []
    try:
        series = [s for s in scan_files(paths).series.values() if s.study_uid == study_uid]
        work = run_study(StudyWork(study_uid, series), _WORKER["model"], _WORKER["prep"], _WORKER["out"])
    except Exception as exc:  # noqa: BLE001 - a bug on one study must not stop the batch
        work = StudyWork(study_uid, series).fail(f"unexpected {describe(exc)}")
    row = summary_row(work)
    if _WORKER.get("stow") is not None and work.sr_path is not None:
        row["stored"] = _stow(_WORKER["stow"], work.sr_path, study_uid)
    return row


def _stow(target, sr_path: Path, study_uid: str) -> str:
    """STOW-RS of a study's SEG (when there is one) and SR: "yes", or why not."""
    from .dicomweb import StowError

    seg = sr_path.parent / seg_filename(study_uid)
    try:
        target.store([*([seg] if seg.exists() else []), sr_path], study_uid)
        return "yes"
    except (StowError, OSError) as exc:
        log.error("%s", exc)
        return f"failed: {exc}"


def summary_row(work: StudyWork) -> dict:
    row = {
        "study_uid": work.study_uid,
        "status": work.status,
        "error": work.reason,
        "series_uid": work.chosen.series_uid if work.chosen else "",
        "slices": work.chosen.slices if work.chosen else 0,  # an Enhanced CT's frames
        "sr": str(work.sr_path.name) if work.sr_path else "",
        "seg": str(work.seg_path.name) if work.seg_path else "",
        "seconds": round(work.timings.get("total_s", 0.0), 3),
    }
    if work.findings is not None:
        f = work.findings
        for j, (fid, p, present, assessed) in enumerate(zip(f.ids, f.probabilities, f.present, f.assessed)):
            row[f"{fid}.probability"] = round(float(p), 6)
            row[f"{fid}.certainty"] = round(f.certainty(j)[0], 6)  # as the SR states it (calibrated)
            row[f"{fid}.present"] = int(bool(present)) if assessed else NOT_ASSESSED
    return row


def write_summary(out: Path, rows: list[dict], finding_ids: list[str], meta: dict) -> None:
    base = ["study_uid", "status", "error", "series_uid", "slices", "sr", "seg", "stored", "seconds"]
    cols = base + [f"{fid}.{k}" for fid in finding_ids for k in ("probability", "certainty", "present")]
    import io

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in sorted(rows, key=lambda r: r["study_uid"]):
        w.writerow(r)
    write_atomic(out / "summary.csv", buf.getvalue())
    write_atomic(
        out / "summary.json", json.dumps({**meta, "studies": sorted(rows, key=lambda r: r["study_uid"])}, indent=1)
    )


def _previous_rows(out: Path) -> dict[str, dict]:
    try:
        return {r["study_uid"]: r for r in json.loads((out / "summary.json").read_text())["studies"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


class BatchError(ValueError):
    """A batch that cannot start (the message names the folder and the problem)."""


def _lock(out: Path):
    """An exclusive lock on ``OUT`` for this run (released when the process ends)."""
    import fcntl

    fh = open(out / ".infer.lock", "w")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise BatchError(
            f"{out}: another ct-zeroshot infer is writing into this folder; wait for it or use another --out"
        ) from None
    return fh


def _resumed_row(sr_path: Path, study_uid: str, pkg, previous: dict | None, paths: list[str] | None = None) -> dict:
    """The summary row of a study whose SR exists: the earlier row, or one rebuilt from the SR. Refuses an
    SR that this package would not have written (another model, or other weights under its UID). ``paths``:
    the study's files, whose headers give an Enhanced CT's slices (its frames; the SR names the instance)."""
    import pydicom

    from .pipeline import sr_uids
    from .sr import read_findings

    ds = pydicom.dcmread(sr_path, stop_before_pixels=True)
    try:  # the CT series (a map SEG, when there is one, is evidence too)
        ref = next(
            s
            for study in ds.CurrentRequestedProcedureEvidenceSequence
            for s in study.ReferencedSeriesSequence
            if str(s.ReferencedSOPSequence[0].ReferencedSOPClassUID) in CT_STORAGE_CLASSES
        )
        series_uid, slices = str(ref.SeriesInstanceUID), len(ref.ReferencedSOPSequence)
        single_frame = str(ref.ReferencedSOPSequence[0].ReferencedSOPClassUID) == CT_IMAGE_STORAGE
    except (AttributeError, IndexError, StopIteration) as exc:
        raise BatchError(f"{sr_path}: an SR without its source series ({type(exc).__name__})") from None
    if str(ds.SOPInstanceUID) != sr_uids(study_uid, series_uid, pkg.identity)[1]:
        raise BatchError(
            f"{sr_path}: written by another model than {pkg.name} {pkg.version} (or other weights under its "
            "UID); pass --force to redo the batch with this model, or use another --out"
        )
    if previous and previous.get("series_uid") == series_uid:
        return {**previous, "resumed": True}
    if not single_frame and paths:  # an Enhanced CT: its frames, as the run that wrote the SR counted them
        found = scan_files(paths).series.get((study_uid, series_uid))
        slices = found.slices if found is not None else slices
    row: dict = {"study_uid": study_uid, "status": "ok", "error": "", "series_uid": series_uid}
    seg = sr_path.parent / seg_filename(study_uid)
    row.update(slices=slices, sr=sr_path.name, seg=seg.name if seg.exists() else "", seconds=0.0, resumed=True)
    findings = read_findings(sr_path)
    for fid in pkg.catalogue.ids:
        f = findings[fid]
        row[f"{fid}.probability"] = round(f["score"], 6)
        row[f"{fid}.certainty"] = round(f["certainty"] / 100.0, 6)
        row[f"{fid}.present"] = int(f["present"]) if f["assessed"] else NOT_ASSESSED
    return row


def _remove_partials(sr_dir: Path) -> None:
    for p in sr_dir.glob(f".*{PARTIAL_SUFFIX}"):
        log.info("removing %s, left by a process killed while writing it", p.name)
        p.unlink(missing_ok=True)


def _rows(todo: list[tuple[str, list[str]]], init_args: tuple, workers: int, engine: str, gpus_per_worker: float):
    """Summary rows of ``todo``'s studies, in the order they finish."""
    if not todo:
        return
    if engine == "ray":
        from . import batch_ray

        yield from batch_ray.run(todo, init_args, workers, gpus_per_worker)
        return
    yield from _local_rows(todo, init_args, max(1, workers))


def _pool(workers: int, init_args: tuple) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(
        max_workers=workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=init_args
    )


WORKER_DIED = "its worker process died while processing it (killed, out of memory, or a crashing decoder)"


def _local_rows(todo: list[tuple[str, list[str]]], init_args: tuple, workers: int):
    """The local process pool, with at most ``workers`` studies in flight so that a worker's death (which
    breaks the whole pool) implicates only those: they are run again, each alone in a fresh pool, and one
    that kills its worker alone fails with that reason; the batch goes on with a fresh pool."""
    try:
        yield from _local_pool_rows(todo, init_args, workers)
    except BaseException:  # Ctrl-C, SIGTERM (cli), an error: no worker outlives the batch
        for child in multiprocessing.active_children():
            child.terminate()
        raise


def _local_pool_rows(todo: list[tuple[str, list[str]]], init_args: tuple, workers: int):
    pending: deque[tuple[str, list[str]]] = deque(todo)
    suspects: deque[tuple[str, list[str]]] = deque()
    while pending or suspects:
        if suspects:
            uid, paths = suspects.popleft()
            with _pool(1, init_args) as pool:
                try:
                    yield pool.submit(_process, uid, paths).result()
                except BrokenProcessPool:
                    yield summary_row(StudyWork(uid, []).fail(WORKER_DIED))
            continue
        with _pool(workers, init_args) as pool:
            running: dict = {}
            while pending or running:
                while pending and len(running) < workers:
                    uid, paths = pending.popleft()
                    running[pool.submit(_process, uid, paths)] = (uid, paths)
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    item = running.pop(fut)
                    try:
                        yield fut.result()
                    except BrokenProcessPool:
                        suspects.append(item)
                if suspects:  # the pool is gone: what was in flight with it is suspect too
                    suspects.extend(running.values())
                    log.warning("a batch worker died; %d studies in flight are run again, each alone", len(suspects))
                    break


def run_batch(
    input_path: str | Path,
    out: str | Path,
    model: str | Path | None = None,
    workers: int = 1,
    force: bool = False,
    progress: bool = True,
    findings: str | Path | None = None,
    findings_mode: str = "add",
    engine: str = "local",
    address: str | None = None,
    gpus_per_worker: float = 0.0,
    maps: bool | None = None,
    stow=None,
    source=None,
    device: str = "auto",
) -> tuple[int, list[dict]]:
    """``findings``: a site's findings file, scored beside (``findings_mode`` add) or instead of (replace)
    the package's findings; its prompts are encoded once per process. ``engine``: ``local`` (a process
    pool on this machine) or ``ray`` (actors on a Ray cluster: ``address``, ``gpus_per_worker``;
    ``operators.batch_ray``); the SRs and the summary are the same. ``maps``: a SEG of the present findings'
    maps beside each SR (None: when the package has them; True refuses a package without). ``stow``: a
    ``dicomweb.StowTarget`` each study's SEG and SR are stored to (the summary's ``stored`` column; a study
    whose files were not stored is stored again by the next run). ``source``: a ``(dicomweb.Source,
    dicomweb.StudyQuery)`` pair: the studies the query selects are retrieved by WADO-RS into
    ``OUT/retrieved/`` (each study's folder appears whole; one there is not retrieved again) and that folder
    is the batch's input (``input_path`` is then the endpoint's URL, for the summary); a study that cannot be
    retrieved is a failed row, the others go on."""

    out = Path(out)
    inp = out / "retrieved" if source is not None else Path(input_path)
    if engine not in ("local", "ray"):
        raise BatchError(f"unknown engine {engine!r}: local or ray")
    if source is None and not inp.exists():
        raise FileNotFoundError(f"{inp}: input folder does not exist")
    pkg = load_package(named_or_demo(model))
    from .contract.scoring import ZeroShotModel, package_with_findings, select_providers

    select_providers(device)  # a device named that is not there (cuda without its provider) is refused here

    maps = ZeroShotModel(
        pkg, device="cpu" if device in ("auto", "cuda") else device, threads=1, maps=maps
    ).maps  # an encoder that cannot run (or OpenVINO that is not there) is refused before anything is written
    if findings is not None:  # refused here, before anything is written, when the file is bad
        pkg = package_with_findings(pkg, findings, findings_mode)
    if engine == "ray":
        try:
            import ray  # noqa: F401  (the optional extra; batch_ray imports it only inside its functions)
        except ImportError as exc:
            raise BatchError(f"--engine ray needs Ray: pip install 'ct-zeroshot[ray]' ({exc})") from None
        from . import batch_ray

        batch_ray.start(address)
    sr_dir = out / "sr"
    sr_dir.mkdir(parents=True, exist_ok=True)
    lock = _lock(out)
    try:
        not_retrieved: dict[str, str] = {}
        if source is not None:
            from .dicomweb import RetrieveError, retrieve_studies

            try:
                not_retrieved = retrieve_studies(source[0], source[1], inp, progress)
            except RetrieveError as exc:
                raise BatchError(str(exc)) from None
        return _run_locked(
            inp,
            out,
            sr_dir,
            pkg,
            workers,
            force,
            progress,
            (findings, findings_mode, maps, stow, device),
            engine,
            gpus_per_worker,
            not_retrieved,
            str(input_path),
        )
    finally:
        lock.close()


def _discover(inp: Path, engine: str) -> dict[str, list[str]]:
    """{study UID: its files}; unusable files are logged by name."""
    if engine == "ray":
        from . import batch_ray

        studies, unreadable = batch_ray.discover(inp)
    else:
        scan = scan_tree(inp)
        studies = {uid: [str(p) for s in series for p in s.paths] for uid, series in scan.studies().items()}
        unreadable = [(str(p), why) for p, why in scan.unreadable]
    for path, why in unreadable:
        log.warning("%s: skipped: %s", path, why)
    return dict(sorted(studies.items()))


def _run_locked(
    inp,
    out,
    sr_dir,
    pkg,
    workers: int,
    force: bool,
    progress: bool,
    custom,
    engine,
    gpus_per_worker,
    not_retrieved: dict[str, str],
    shown_input: str,
):
    from tqdm import tqdm

    t0 = time.perf_counter()
    studies = _discover(inp, engine)
    previous = _previous_rows(out)
    rows = [summary_row(StudyWork(uid, []).fail(why)) for uid, why in not_retrieved.items() if uid not in studies]
    todo = []
    for uid, paths in studies.items():
        if not force and (sr_dir / sr_filename(uid)).exists():
            rows.append(_resumed_row(sr_dir / sr_filename(uid), uid, pkg, previous.get(uid), paths))
        else:
            todo.append((uid, paths))
    resumed = sum(1 for r in rows if r.get("resumed"))  # not the studies that could not be retrieved
    log.info(
        "%d studies in %s: %d to process, %d already done; %d worker(s), engine %s",
        len(studies),
        inp,
        len(todo),
        resumed,
        workers,
        engine,
    )
    _remove_partials(sr_dir)  # a run killed while writing; none can be writing now (the lock on OUT)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    bar = tqdm(total=len(todo), unit="study", desc="infer", disable=not progress)
    init_args = (str(pkg.root), str(sr_dir), threads, log.getEffectiveLevel(), *custom)
    for row in _rows(todo, init_args, workers, engine, gpus_per_worker):
        rows.append(row)
        bar.update(1)
    bar.close()
    _remove_partials(sr_dir)  # a worker killed while writing an SR (its study was retried or failed)
    stow = custom[3]  # (findings file, findings mode, maps, STOW-RS target, device), as the workers get them
    if stow is not None:  # studies done before whose files the endpoint has not stored yet
        for row in rows:
            if row.get("resumed") and row.get("status") == "ok" and row.get("stored") != "yes":
                row["stored"] = _stow(stow, sr_dir / sr_filename(row["study_uid"]), row["study_uid"])
    elapsed = time.perf_counter() - t0
    failed = [r for r in rows if r["status"] != "ok"]
    not_stored = [r for r in rows if str(r.get("stored", "")).startswith("failed")]
    meta = {
        "input": shown_input,
        "model": {
            "name": pkg.name,
            "version": pkg.version,
            "uid": pkg.uid,
            "identity": pkg.identity,
            "root": str(pkg.root),
            "intended_use": pkg.intended_use,
            "custom_findings": None if pkg.custom_findings is None else pkg.custom_findings.to_dict(),
        },
        "workers": workers,
        "engine": engine,
        "device": custom[4],
        "processed": len(todo),
        "resumed": resumed,
        "failed": len(failed),
        "stow": None if stow is None else {"url": stow.url, "not_stored": len(not_stored)},
        "seconds": round(elapsed, 2),
        "complete": True,
    }
    write_summary(out, rows, pkg.catalogue.ids, meta)
    log.info(
        "%d studies: %d ok, %d failed, %d skipped as done (%.1f s); summary %s",
        len(rows),
        len(rows) - len(failed),
        len(failed),
        resumed,
        elapsed,
        out / "summary.csv",
    )
    for r in failed:
        log.error("failed: study %s: %s", r["study_uid"], r["error"])
    return (1 if failed or not_stored else 0), rows
