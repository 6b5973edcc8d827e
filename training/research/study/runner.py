"""Running the arm x seed grid: one training run per job, resumable, ``jobs`` at a time."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import numpy as np

from operators.contract.files import write_json

from ...config import TrainConfig
from .arms import ARM_BY_NAME, StudyPreset
from .report import aggregate, finished_run, run_dir


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _follow_parent(parent: int) -> None:
    """Pool worker initializer: exit when the study process is gone (killed, even with SIGKILL), so that
    no orphaned run goes on training into a folder a later study may have removed or reused."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="follow-study", daemon=True).start()


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through the study's finally: the session's time is recorded


def _run_one(job: dict) -> dict:
    """One arm x seed: train (or resume), evaluate on the split, write ``study_run.json`` last."""
    import torch
    import transformers

    from ...evaluate_run import evaluate_run
    from ...train import train

    transformers.utils.logging.disable_progress_bar()  # one study bar, not one per checkpoint load
    transformers.utils.logging.set_verbosity_error()
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    rank, world = _rank()
    rd = Path(job["run"])
    preset = StudyPreset(**job["preset"])
    cfg = preset.train_config(ARM_BY_NAME[job["arm"]], job["seed"])
    t0 = time.time()
    try:
        summary = train(job["data"], rd, cfg, cache_dir=job["cache"], progress=False)
        t1 = time.time()
        if rank == 0:  # under torchrun every rank trains; rank 0 evaluates and records
            evaluate_run(
                rd,
                job["data"],
                split=preset.split,
                checkpoint="best",
                cache_dir=job["cache"],
                progress=False,
                occlusion_levels=tuple(preset.occlusion),
            )
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return {"arm": job["arm"], "seed": job["seed"], "rank": rank}
        metrics = json.loads((rd / "metrics.json").read_text())
        share = _finding_share(job["data"], cfg)
    except Exception as exc:  # one failed run never stops the study
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "error.txt").write_text(traceback.format_exc())
        return {"arm": job["arm"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"}
    info = {
        "arm": job["arm"],
        "seed": job["seed"],
        "config_digest": cfg.digest(),
        "train_seconds": round(t1 - t0, 1),
        "eval_seconds": round(time.time() - t1, 1),
        "macro_f1": metrics["zero_shot"]["macro_f1"],
        "best_step": summary["best"]["step"],
        "pool_size": summary["pool_size"],
        "sampler_shortfall": summary["sampler_shortfall"],
        "finding_share": share,
    }
    (rd / "error.txt").unlink(missing_ok=True)
    write_json(rd / "study_run.json", info)
    return info


def _finding_share(data: str, cfg: TrainConfig) -> dict:
    """What the run's section batches held (replayed from the sampler, a pure function of the seed)."""
    from ...data import load_studies
    from ...sampling import BatchPlanner

    train = [s for s in load_studies(data, check_images=False) if s.split == "train"]
    return BatchPlanner(train, cfg).finding_share(cfg.train.steps)


def run_study(
    preset: StudyPreset,
    data: str | Path,
    out: str | Path,
    seeds: int | None = None,
    resume: bool = False,
    cache_dir: str | Path | None = None,
    jobs: int | None = None,
    progress: bool = True,
    arms: list[str] | None = None,
) -> dict:
    """Run (or resume) every arm x seed, then aggregate. Returns the study record. ``arms``: run only these
    of the preset's arms (e.g. more seeds of the main contrasts' arms); the others keep what they have."""
    from tqdm import tqdm

    from ...cache import VolumeCache, default_cache_dir
    from ...data import load_studies

    out = Path(out)
    data = Path(data).resolve()
    seeds = seeds or preset.seeds
    jobs = preset.jobs if jobs is None else jobs
    if jobs == 0:  # from the cores: each run uses the preset's threads (torch's default: all cores)
        jobs = max(1, (os.cpu_count() or 1) // max(1, preset.threads or (os.cpu_count() or 1)))
    record_path = out / "study.json"
    record = {"preset": preset.name, "preset_fields": preset.digest_fields(), "data": str(data)}
    main = _rank()[0] == 0
    if _rank()[1] > 1:
        jobs = 1  # under torchrun: one run at a time across all ranks
    if main and record_path.exists():  # rank 0 owns the study folder and its checks
        prev = json.loads(record_path.read_text())
        if not resume:
            raise FileExistsError(f"{out}: holds a study already; pass --resume to continue it or use a new --out")
        same_data = prev.get("data") is not None and Path(prev["data"]).resolve() == data
        if prev.get("preset_fields") != record["preset_fields"] or not same_data:
            raise ValueError(f"{out}: holds a study with a different preset or data set; use a new --out")
        record = prev
    elif main and out.exists() and any(out.iterdir()) and not resume:
        raise FileExistsError(f"{out}: exists and is not empty; use a new --out")
    out.mkdir(parents=True, exist_ok=True)
    record["seeds"] = seeds
    record.setdefault("sessions", [])
    if main:
        write_json(record_path, record)

    studies = load_studies(data)
    if preset.split not in {s.split for s in studies}:
        raise ValueError(f"{data}: no studies in split {preset.split!r}")
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    # Build the preprocessed-volume cache once here, so that parallel runs only read it.
    spec = preset.train_config(ARM_BY_NAME["random"], 0).spec
    if main:
        VolumeCache(cache, spec).build(studies, workers=min(os.cpu_count() or 1, 8), progress=progress)

    if arms is not None:
        unknown = [a for a in arms if a not in preset.arms]
        if unknown:
            raise ValueError(f"--arms: {unknown} not among the preset's arms {list(preset.arms)}")
    todo, done = [], 0
    for arm_name in arms if arms is not None else preset.arms:
        arm = ARM_BY_NAME[arm_name]
        for seed in range(seeds):
            cfg = preset.train_config(arm, seed)
            rd = run_dir(out, arm.name, seed)
            if finished_run(rd, cfg.digest()):
                done += 1
                continue
            if (rd / "config.yaml").exists() and TrainConfig.load(str(rd / "config.yaml")).digest() != cfg.digest():
                raise ValueError(f"{rd}: holds a run with a different config; remove it or use a new --out")
            todo.append(
                {
                    "arm": arm.name,
                    "seed": seed,
                    "run": str(rd),
                    "data": str(data),
                    "cache": str(cache),
                    "preset": asdict(preset),
                    "threads": preset.threads,
                }
            )
    total = done + len(todo)
    progress = progress and main
    if progress:
        print(
            f"study {preset.name}: {len(arms or preset.arms)} arms x {seeds} seeds = {total} runs; {done} finished "
            f"before, {len(todo)} to run, {jobs} at a time",
            flush=True,
        )
    t0 = time.time()
    failures: list[dict] = []
    walls: list[float] = []
    bar = tqdm(total=total, initial=done, desc="study", unit="run", disable=not progress)

    def report(info: dict) -> None:
        if "rank" in info:
            return
        if "error" in info:
            failures.append(info)
            bar.write(f"  FAILED {info['arm']} seed {info['seed']}: {info['error']} (see its error.txt)")
        else:
            walls.append(info["train_seconds"] + info["eval_seconds"])
            bar.write(
                f"  {info['arm']:28s} seed {info['seed']}: test macro F1 {info['macro_f1']:.4f} "
                f"(train {info['train_seconds']:.0f} s, eval {info['eval_seconds']:.0f} s)"
            )
        bar.update()
        left = total - bar.n
        if walls and left:  # runs left x median run wall time / runs at a time
            bar.set_postfix_str(f"~{left * float(np.median(walls)) / jobs / 60:.0f} min left", refresh=True)

    def session(interrupted: bool) -> dict:
        entry = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
            "runs": len(walls) + len(failures),  # runs finished in this session (the bar does not count when quiet)
            "jobs": jobs,
            "threads": preset.threads,
            "seconds": round(time.time() - t0, 1),
        }
        return {**entry, "interrupted": True} if interrupted else entry

    on_main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _sigterm_to_exit) if on_main_thread else None
    try:
        if jobs == 1 or len(todo) <= 1:
            for job in todo:
                report(_run_one(job))
        else:
            import multiprocessing

            # multiprocessing's Pool rather than concurrent.futures: leaving its block, an interruption
            # included, terminates the workers instead of waiting minutes for their runs to end.
            ctx = multiprocessing.get_context("spawn")
            with ctx.Pool(jobs, initializer=_follow_parent, initargs=(os.getpid(),)) as pool:
                for info in pool.imap_unordered(_run_one, todo, chunksize=1):
                    report(info)
    except (KeyboardInterrupt, SystemExit):
        bar.close()
        if main:  # the time spent counts toward the study's wall time; its finished runs are on disk
            record["sessions"].append(session(interrupted=True))
            write_json(record_path, record)
            finished_runs = done + len(walls) + len(failures)
            print(
                f"study interrupted: {finished_runs} of {total} runs finished; rerun with --resume to continue",
                flush=True,
            )
        raise
    finally:
        if on_main_thread:
            signal.signal(signal.SIGTERM, old_term)
    bar.close()
    if not main:
        return record
    record["sessions"].append(session(interrupted=False))
    record["failures"] = failures
    write_json(record_path, record)
    aggregate(preset, out, seeds, record, progress=progress)
    if failures:
        raise RuntimeError(
            f"{len(failures)} run(s) failed: "
            + "; ".join(f"{f['arm']} seed {f['seed']}: {f['error']}" for f in failures)
        )
    return record


# ---------------------------------------------------------------------------------------------
# Aggregating
