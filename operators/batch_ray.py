"""``ct-zeroshot infer --engine ray``: the same batch on a Ray cluster (one machine or many).

Ray (the optional extra ``ct-zeroshot[ray]``) is imported here only. What changes from the local engine
(``operators.batch``) is where the work runs, not what it does:

- **Discovery.** The driver lists the archive's files; their headers are read by Ray tasks in chunks of
  ``SCAN_CHUNK`` files when the archive is larger than one chunk (a header scan of a few hundred thousand
  studies is hours on one core), else in the driver. Only (study UID, path) pairs come back: workers
  re-read the headers of their study anyway, as the local engine's workers do.
- **Workers.** A pool of Ray actors, each holding one loaded model package: the package is verified and
  its ONNX Runtime sessions created once per actor (``batch._init_worker``), on a GPU when the actor
  was given one (``--gpus-per-worker``). Each study is ``batch._process``: the same stages, the same SR
  and the same summary row as the local engine.
- **A worker that dies** (killed, out of memory, a crashing decoder) is restarted by Ray and its study
  retried, up to ``STUDY_RETRIES`` times; a study that kills its worker every time is reported failed
  with that reason, and the batch goes on.
- **Storage.** SRs are written by the workers straight into ``OUT/sr/``, so ``OUT`` and the archive
  must be on a filesystem every node sees at the same path (NFS, a cluster filesystem); the summary is
  written by the driver, when the batch ends, as with the local engine.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from .contract.dicom_series import scan_files
from .pipeline import StudyWork

log = logging.getLogger("ct-zeroshot")

SCAN_CHUNK = 2000  # files whose headers one scan task reads
STUDY_RETRIES = 2  # a study whose worker dies is retried this many times on the restarted worker


def _scan_chunk(paths: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(study UID, path) of every usable file in ``paths``, and (path, reason) of the unusable ones."""
    scan = scan_files(paths)
    found = [(s.study_uid, str(p)) for s in scan.series.values() for p in s.paths]
    return found, [(str(p), why) for p, why in scan.unreadable]


def start(address: str | None) -> None:
    """Join the cluster at ``address`` (``auto``: the one ``ray start`` runs on this machine), or start a
    local one with this machine's cores."""
    import ray

    if ray.is_initialized():
        return
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": True}
    # The site's UID root and procedure code (--uid-root, --procedure) reach the workers on every node.
    site = {k: os.environ[k] for k in ("CTZS_UID_ROOT", "CTZS_PROCEDURE") if k in os.environ}
    if site:
        kwargs["runtime_env"] = {"env_vars": site}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Ray starts its workers at niceness 15 (so that its own daemons stay responsive); on a machine
        # shared with other work that would starve the batch, which is this cluster's only job.
        os.environ.setdefault("RAY_worker_niceness", "0")
        ray.init(num_cpus=os.cpu_count() or 1, **kwargs)
    res = ray.cluster_resources()
    log.info("ray: %d node(s), %g CPUs, %g GPUs", len(ray.nodes()), res.get("CPU", 0), res.get("GPU", 0))


def discover(root: Path) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """{study UID: its files} under ``root`` and the unusable files, the headers read on the cluster."""
    import ray

    files = [str(root)] if root.is_file() else sorted(str(Path(d) / f) for d, _, fs in os.walk(root) for f in fs)
    chunks = [files[i : i + SCAN_CHUNK] for i in range(0, len(files), SCAN_CHUNK)]
    if len(chunks) > 1:
        task = ray.remote(num_cpus=1)(_scan_chunk)
        parts = ray.get([task.remote(c) for c in chunks])
    else:
        parts = [_scan_chunk(c) for c in chunks]
    studies: dict[str, list[str]] = {}
    unreadable: list[tuple[str, str]] = []
    for found, bad in parts:
        for uid, path in found:
            studies.setdefault(uid, []).append(path)
        unreadable += bad
    return studies, unreadable


def _worker_class(cpus: float, gpus: float):
    import ray

    from . import batch

    @ray.remote(num_cpus=cpus, num_gpus=gpus, max_restarts=-1, max_task_retries=STUDY_RETRIES)
    class StudyWorker:
        """One loaded model package; studies one at a time (``batch._process``)."""

        def __init__(self, init_args: tuple):
            batch._init_worker(*init_args)

        def process(self, study_uid: str, paths: list[str]) -> dict:
            return batch._process(study_uid, paths)

    return StudyWorker


def run(todo: list[tuple[str, list[str]]], init_args: tuple, workers: int, gpus_per_worker: float) -> Iterator[dict]:
    """Summary rows of ``todo``'s studies as they finish, on ``workers`` actors. ``init_args`` are
    ``batch._init_worker``'s, the thread count among them replaced by the actor's share of the cluster."""
    import ray
    from ray.exceptions import RayActorError, RayTaskError

    from .batch import summary_row

    workers = max(1, min(workers, len(todo)))
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1) // workers))
    args = (init_args[0], init_args[1], cpus, *init_args[3:])
    actors = [_worker_class(cpus, gpus_per_worker).remote(args) for _ in range(workers)]
    queue, idle = deque(todo), list(actors)
    pending: dict = {}  # ObjectRef of a study's result -> (study UID, the actor running it)
    try:
        while queue or pending:
            while idle and queue:
                actor, (uid, paths) = idle.pop(), queue.popleft()
                pending[actor.process.remote(uid, paths)] = (uid, actor)
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                uid, actor = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except RayActorError as exc:  # the worker died on every try
                    reason = f"the worker process died {STUDY_RETRIES + 1} times on this study ({type(exc).__name__})"
                    row = summary_row(StudyWork(uid, []).fail(reason))
                except RayTaskError as exc:  # batch._process catches its own errors: a bug in the glue
                    row = summary_row(StudyWork(uid, []).fail(f"unexpected {type(exc.cause).__name__}"))
                idle.append(actor)
                yield row
    finally:
        for actor in actors:
            ray.kill(actor)
