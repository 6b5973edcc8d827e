"""Sampler studies: ``ct-zeroshot-train study --preset NAME --data DIR --out DIR [--seeds K] [--resume]``.

Runs the seed paper's arms with K seeds each, every arm with the same steps, LR schedule and
alternation schedule (only ``sampler.*`` differs between arms), evaluates every run on the test
split (zero-shot F1/AUROC, retrieval, occlusion) and writes, in DIR:

- ``results.csv``: one row per (arm, seed, metric, value);
- ``summary.md``: per-arm mean +- std over seeds, the paired-bootstrap 95 % CI of each arm's
  difference to its comparison arm (same seeds, the same resampled test studies), the paper's
  number beside ours, the verdict per comparison, per-finding data sensitivity;
- ``arms.png``, ``scaling.png``, ``per_finding.png``, ``occlusion.png``;
- ``runs/<arm>/seed<k>/``: each run (an ordinary training run, resumable on its own).

A study is resumable: ``--resume`` skips runs that finished (``study_run.json`` is written last,
after the test metrics and predictions) and resumes a run that was cut off from its last
checkpoint, which the training loop does exactly. Runs are independent processes
(``jobs`` at a time, ``threads`` torch threads each); a run's result does not depend on the order.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from .config import ConfigError, TrainConfig
from .files import write_atomic, write_json

SUBSET_FRACTION = 4362 / 15331  # the paper's subset of Merlin's training split


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    sampler: dict  # sampler.* overrides (the subset fraction is filled in from the preset)
    paper: str  # the paper's macro F1 (%) as published
    compare_to: str  # the arm the paper compares this one with ("" for the baseline)


ARMS: tuple[Arm, ...] = (
    Arm("random", "full data, random sampling (baseline)", {"kind": "random"}, "74.45", ""),
    Arm("balanced-25-75", "full data, section-balanced 25:75", {"kind": "balanced", "ratio": "25:75"},
        "71.65-72.02", "random"),
    Arm("balanced-50-50", "full data, section-balanced 50:50", {"kind": "balanced", "ratio": "50:50"},
        "71.65-72.02", "random"),
    Arm("balanced-75-25", "full data, section-balanced 75:25", {"kind": "balanced", "ratio": "75:25"},
        "72.02", "random"),
    Arm("subset-20", "subset, 20 %, random", {"kind": "random", "subset": True, "data_fraction": 0.2},
        "65.26", "subset-100"),
    Arm("subset-40", "subset, 40 %, random", {"kind": "random", "subset": True, "data_fraction": 0.4},
        "not published", "subset-100"),
    Arm("subset-100", "subset, 100 %, random", {"kind": "random", "subset": True, "data_fraction": 1.0},
        "71.88", "random"),
    Arm("subset-100-balanced-50-50", "subset, 100 %, section-balanced 50:50",
        {"kind": "balanced", "ratio": "50:50", "subset": True, "data_fraction": 1.0}, "68.01", "subset-100"),
)
ARM_BY_NAME = {a.name: a for a in ARMS}
SCALING_ARMS = ("subset-20", "subset-40", "subset-100")


@dataclass
class StudyPreset:
    name: str = "custom"
    description: str = ""
    train_preset: str = "cpu-tiny"
    overrides: list = field(default_factory=list)  # applied to every arm's training config
    seeds: int = 3
    jobs: int = 1  # runs at a time
    threads: int = 0  # torch threads per run (0: torch's default)
    subset_fraction: float = SUBSET_FRACTION
    split: str = "test"
    occlusion: list = field(default_factory=lambda: [0.0, 0.1, 0.25, 0.5])
    bootstrap: int = 1000
    arms: list = field(default_factory=lambda: [a.name for a in ARMS])

    @classmethod
    def available(cls) -> list[str]:
        folder = resources.files("training").joinpath("presets", "study")
        return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))

    @classmethod
    def load(cls, name: str) -> "StudyPreset":
        path = Path(name)
        if path.suffix in (".yaml", ".yml") and path.exists():
            text = path.read_text()
        else:
            f = resources.files("training").joinpath("presets", "study", f"{name}.yaml")
            if not f.is_file():
                raise ConfigError(f"study preset {name!r} does not exist; available: {', '.join(cls.available())}")
            text = f.read_text()
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"study preset {name!r}: expected a mapping")
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ConfigError(f"study preset {name!r}: unknown key(s) {sorted(unknown)}")
        data.setdefault("name", path.stem if path.suffix in (".yaml", ".yml") else name)
        preset = cls(**data)
        preset.validate()
        return preset

    def validate(self) -> None:
        bad = [a for a in self.arms if a not in ARM_BY_NAME]
        if bad:
            raise ConfigError(f"study arms {bad} do not exist; known: {list(ARM_BY_NAME)}")
        if "random" not in self.arms:
            raise ConfigError("a study needs the baseline arm 'random'")
        if self.seeds < 1 or self.jobs < 1 or self.bootstrap < 0:
            raise ConfigError("seeds and jobs must be >= 1 and bootstrap >= 0")
        if not 0 < self.subset_fraction <= 1:
            raise ConfigError(f"subset_fraction must be in (0, 1], got {self.subset_fraction}")
        for a in self.arms:  # every arm's config must load (a bad override is named here, not an hour in)
            self.train_config(ARM_BY_NAME[a], 0)

    def train_config(self, arm: Arm, seed: int) -> TrainConfig:
        s = dict(arm.sampler)
        sub = s.pop("subset", False)
        over = [f"sampler.{k}={v}" for k, v in s.items()]
        over.append(f"sampler.subset_fraction={self.subset_fraction if sub else 1.0}")
        # Arms differ only in the sampler: steps, LR schedule and alternation come from the preset.
        return TrainConfig.load(self.train_preset, list(self.overrides) + over + [f"train.seed={seed}"])

    def digest_fields(self) -> dict:
        d = asdict(self)
        d.pop("seeds")  # more seeds may be added to a study on --resume
        d.pop("jobs")
        d.pop("threads")
        return d


# ---------------------------------------------------------------------------------------------
# Running


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / arm / f"seed{seed}"


def _finished(rd: Path, digest: str) -> dict | None:
    marker = rd / "study_run.json"
    if not marker.exists():
        return None
    info = json.loads(marker.read_text())
    return info if info.get("config_digest") == digest else None


def _rank() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _run_one(job: dict) -> dict:
    """One arm x seed: train (or resume), evaluate on the split, write ``study_run.json`` last."""
    import torch
    import transformers

    from .evaluate_run import evaluate_run
    from .train import train

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
            evaluate_run(rd, job["data"], split=preset.split, checkpoint="best", cache_dir=job["cache"],
                         progress=False, occlusion_levels=tuple(preset.occlusion))
        if world > 1:
            torch.distributed.barrier()
        if rank != 0:
            return {"arm": job["arm"], "seed": job["seed"], "rank": rank}
        metrics = json.loads((rd / "metrics.json").read_text())
    except Exception as exc:  # one failed run never stops the study
        rd.mkdir(parents=True, exist_ok=True)
        (rd / "error.txt").write_text(traceback.format_exc())
        return {"arm": job["arm"], "seed": job["seed"], "error": f"{type(exc).__name__}: {exc}"}
    info = {"arm": job["arm"], "seed": job["seed"], "config_digest": cfg.digest(),
            "train_seconds": round(t1 - t0, 1), "eval_seconds": round(time.time() - t1, 1),
            "macro_f1": metrics["zero_shot"]["macro_f1"], "best_step": summary["best"]["step"],
            "pool_size": summary["pool_size"], "sampler_shortfall": summary["sampler_shortfall"]}
    (rd / "error.txt").unlink(missing_ok=True)
    write_json(rd / "study_run.json", info)
    return info


def run_study(preset: StudyPreset, data: str | Path, out: str | Path, seeds: int | None = None,
              resume: bool = False, cache_dir: str | Path | None = None, jobs: int | None = None,
              progress: bool = True) -> dict:
    """Run (or resume) every arm x seed, then aggregate. Returns the study record."""
    from tqdm import tqdm

    from .cache import VolumeCache
    from .data import load_studies
    from .runs import default_cache_dir

    out = Path(out)
    data = Path(data).resolve()
    seeds = seeds or preset.seeds
    jobs = jobs or preset.jobs
    record_path = out / "study.json"
    record = {"preset": preset.name, "preset_fields": preset.digest_fields(), "data": str(data)}
    main = _rank()[0] == 0
    if _rank()[1] > 1:
        jobs = 1  # under torchrun: one run at a time across all ranks
    if main and record_path.exists():  # rank 0 owns the study folder and its checks
        prev = json.loads(record_path.read_text())
        if not resume:
            raise FileExistsError(f"{out}: holds a study already; pass --resume to continue it or use a new --out")
        if prev.get("preset_fields") != record["preset_fields"] or prev.get("data") != record["data"]:
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

    todo, done = [], 0
    for arm_name in preset.arms:
        arm = ARM_BY_NAME[arm_name]
        for seed in range(seeds):
            cfg = preset.train_config(arm, seed)
            rd = run_dir(out, arm.name, seed)
            if _finished(rd, cfg.digest()):
                done += 1
                continue
            if (rd / "config.yaml").exists() and TrainConfig.load(str(rd / "config.yaml")).digest() != cfg.digest():
                raise ValueError(f"{rd}: holds a run with a different config; remove it or use a new --out")
            todo.append({"arm": arm.name, "seed": seed, "run": str(rd), "data": str(data), "cache": str(cache),
                         "preset": asdict(preset), "threads": preset.threads})
    total = done + len(todo)
    progress = progress and main
    if progress:
        print(f"study {preset.name}: {len(preset.arms)} arms x {seeds} seeds = {total} runs; {done} finished before, "
              f"{len(todo)} to run, {jobs} at a time", flush=True)
    t0 = time.time()
    failures = []
    bar = tqdm(total=total, initial=done, desc="study", unit="run", disable=not progress)

    def report(info: dict) -> None:
        if "rank" in info:
            return
        if "error" in info:
            failures.append(info)
            bar.write(f"  FAILED {info['arm']} seed {info['seed']}: {info['error']} (see its error.txt)")
        else:
            bar.write(f"  {info['arm']:28s} seed {info['seed']}: test macro F1 {info['macro_f1']:.4f} "
                      f"(train {info['train_seconds']:.0f} s, eval {info['eval_seconds']:.0f} s)")
        bar.update()

    if jobs == 1 or len(todo) <= 1:
        for job in todo:
            report(_run_one(job))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            for fut in as_completed([pool.submit(_run_one, j) for j in todo]):
                report(fut.result())
    bar.close()
    if not main:
        return record
    record["sessions"].append({"started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(t0)),
                               "runs": len(todo), "jobs": jobs, "threads": preset.threads,
                               "seconds": round(time.time() - t0, 1)})
    record["failures"] = failures
    write_json(record_path, record)
    aggregate(preset, out, seeds, record, progress=progress)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: " + "; ".join(f"{f['arm']} seed {f['seed']}: {f['error']}"
                                                                          for f in failures))
    return record


# ---------------------------------------------------------------------------------------------
# Aggregating


def _flatten(prefix: str, obj, rows: list) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, rows)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        rows.append((prefix, float(obj)))


def run_metrics(rd: Path) -> list[tuple[str, float]]:
    """(metric, value) pairs of one finished run."""
    m = json.loads((rd / "metrics.json").read_text())
    rows: list = [("macro_f1", m["zero_shot"]["macro_f1"]), ("macro_auroc", m["zero_shot"]["macro_auroc"])]
    for fid, v in m["zero_shot"]["per_finding"].items():
        for key in ("f1", "auroc"):
            if v[key] is not None:
                rows.append((f"{key}/{fid}", v[key]))
    _flatten("retrieval", {k: v for k, v in m["retrieval"].items() if k != "n"}, rows)
    _flatten("occlusion", m["occlusion"], rows)
    info = json.loads((rd / "study_run.json").read_text())
    with open(rd / "epochs.csv", newline="") as fh:
        epochs = [int(r["unique_volumes"]) for r in csv.DictReader(fh)]
    rows += [("unique_volumes_per_epoch", float(np.mean(epochs))), ("pool_size", float(info["pool_size"])),
             ("best_step", float(info["best_step"])), ("train_seconds", info["train_seconds"]),
             ("eval_seconds", info["eval_seconds"])]
    return rows


def _predictions(rd: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z = np.load(rd / "metrics_predictions.npz")
    return (z["margins"] > 0).astype(np.int8), z["labels"], z["study_ids"]


def paired_bootstrap(pred_a: list[np.ndarray], pred_b: list[np.ndarray], labels: np.ndarray, n_boot: int,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of macro F1(a) - macro F1(b), and its 95 % percentile CI from resampling the
    test studies (the same resample for every seed and both arms)."""
    from .evaluate import macro_f1_from

    def diff(idx):
        lab = labels[idx]
        return float(np.mean([macro_f1_from(a[idx], lab) - macro_f1_from(b[idx], lab)
                              for a, b in zip(pred_a, pred_b)]))

    n = labels.shape[0]
    point = diff(np.arange(n))
    if n_boot == 0:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    boots = np.array([diff(rng.integers(0, n, n)) for _ in range(n_boot)])
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def _paper_value(text: str) -> float | None:
    """The paper's number as a fraction; a published range gives its midpoint, unpublished None."""
    try:
        parts = [float(p) for p in text.split("-")]
    except ValueError:
        return None
    return sum(parts) / len(parts) / 100


def verdict(ours: tuple[float, float, float], paper_delta: float | None) -> str:
    point, lo, hi = ours
    if math.isnan(lo):
        return "no CI (bootstrap off)"
    if lo <= 0 <= hi:
        return "inside the noise (CI crosses 0)"
    if paper_delta is None:
        return "no published number"
    return "same direction as the paper" if (point > 0) == (paper_delta > 0) else "opposite to the paper"


def aggregate(preset: StudyPreset, out: Path, seeds: int, record: dict | None = None, progress: bool = True) -> None:
    """results.csv, summary.md and the plots from every finished run of the study."""
    from operators.findings import load_catalogue

    arms = [ARM_BY_NAME[a] for a in preset.arms]
    finished: dict[str, list[int]] = {}
    rows = []
    for arm in arms:
        for seed in range(seeds):
            rd = run_dir(out, arm.name, seed)
            if not _finished(rd, preset.train_config(arm, seed).digest()):
                continue
            finished.setdefault(arm.name, []).append(seed)
            rows += [(arm.name, seed, k, v) for k, v in run_metrics(rd)]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["arm", "seed", "metric", "value"])
    w.writerows((a, s, k, f"{v:.6g}") for a, s, k, v in rows)
    write_atomic(out / "results.csv", buf.getvalue())

    table: dict[tuple[str, str], list[float]] = {}
    for a, _s, k, v in rows:
        table.setdefault((a, k), []).append(v)

    def stat(arm: str, key: str) -> tuple[float, float, int]:
        v = table.get((arm, key), [])
        if not v:
            return math.nan, math.nan, 0
        return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)

    preds, labels_ref = {}, None
    for arm, ss in finished.items():
        preds[arm] = {}
        for s in ss:
            p, lab, ids = _predictions(run_dir(out, arm, s))
            if labels_ref is None:
                labels_ref, ids_ref = lab, ids
            elif not np.array_equal(ids, ids_ref):
                raise ValueError(f"{run_dir(out, arm, s)}: evaluated on different studies than the other runs")
            preds[arm][s] = p

    def compare(a: str, b: str) -> tuple[float, float, float] | None:
        common = sorted(set(preds.get(a, {})) & set(preds.get(b, {})))
        if not common:
            return None
        return paired_bootstrap([preds[a][s] for s in common], [preds[b][s] for s in common], labels_ref,
                                preset.bootstrap, seed=0)

    deltas = {arm.name: compare(arm.name, "random") for arm in arms if arm.name != "random"}
    comparisons = []
    for arm in arms:
        if not arm.compare_to or arm.compare_to not in preset.arms:
            continue
        ours = compare(arm.name, arm.compare_to)
        pa, pb = _paper_value(arm.paper), _paper_value(ARM_BY_NAME[arm.compare_to].paper)
        paper_delta = None if pa is None or pb is None else pa - pb
        comparisons.append((arm, ours, paper_delta))

    catalogue = load_catalogue()
    text = _summary_md(preset, out, seeds, record or {}, arms, finished, stat, deltas, comparisons, catalogue,
                       labels_ref)
    write_atomic(out / "summary.md", text)
    _plots(preset, out, arms, stat, catalogue)
    if progress:
        print(f"results: {out / 'results.csv'}\nsummary: {out / 'summary.md'}", flush=True)


def _pm(mean: float, std: float, scale: float = 100) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean * scale:.2f}" + ("" if math.isnan(std) else f" +- {std * scale:.2f}")


def _ci(c) -> str:
    if c is None:
        return "-"
    point, lo, hi = c
    if math.isnan(lo):
        return f"{point * 100:+.2f}"
    return f"{point * 100:+.2f} [{lo * 100:+.2f}, {hi * 100:+.2f}]"


def _shown(path) -> str:
    """A path as a reader would type it: relative to the working directory when below it."""
    p = Path(path).resolve()
    try:
        return str(p.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _summary_md(preset, out, seeds, record, arms, finished, stat, deltas, comparisons, catalogue, labels) -> str:
    base_cfg = preset.train_config(ARM_BY_NAME["random"], 0)
    t = base_cfg.train
    n_runs = sum(len(v) for v in finished.values())
    seconds = sum(s["seconds"] for s in record.get("sessions", []))
    lines = [f"# Sampler study `{preset.name}`", "",
             preset.description.strip(), "",
             f"- Command: `ct-zeroshot-train study --preset {preset.name} --data {_shown(record.get('data', '?'))} "
             f"--out {_shown(out)} --seeds {seeds}`",
             f"- Runs finished: {n_runs} of {len(arms) * seeds} ({len(arms)} arms x {seeds} seeds); "
             f"wall time of the study command(s): {seconds / 60:.1f} min",
             f"- Every arm: training preset `{preset.train_preset}` with {list(preset.overrides)}; "
             f"{t.steps} steps of batch {t.batch_size}, the same LR schedule and alternation schedule; "
             f"only `sampler.*` differs. Checkpoint chosen on validation zero-shot macro F1.",
             f"- Subset: {preset.subset_fraction:.4f} of the training split (the paper's: 4,362 / 15,331 = "
             f"{SUBSET_FRACTION:.4f}), "
             f"fixed by `sampler.subset_seed`; 20 % within 40 % within 100 %.",
             f"- Evaluated on the `{preset.split}` split ({0 if labels is None else labels.shape[0]} studies); "
             f"CIs: paired bootstrap over test studies ({preset.bootstrap} resamples), seeds averaged inside "
             "each resample. Macro F1 in %.", ""]
    lines += ["## Arms", "",
              "| arm | pool | unique volumes / epoch | macro F1 (mean +- std) | macro AUROC | "
              "delta vs random [95% CI] | paper macro F1 |", "|---|---|---|---|---|---|---|"]
    for arm in arms:
        m, s, n = stat(arm.name, "macro_f1")
        auc = stat(arm.name, "macro_auroc")
        pool = stat(arm.name, "pool_size")[0]
        uniq = stat(arm.name, "unique_volumes_per_epoch")[0]
        lines.append(f"| {arm.label} (`{arm.name}`, n={n}) | {'-' if math.isnan(pool) else int(pool)} | "
                     f"{'-' if math.isnan(uniq) else f'{uniq:.0f}'} | {_pm(m, s)} | {_pm(*auc[:2])} | "
                     f"{'baseline' if arm.name == 'random' else _ci(deltas.get(arm.name))} | {arm.paper} |")
    lines += ["", "## The paper's comparisons", "",
              "| comparison | ours: delta [95% CI] | paper: delta | verdict |", "|---|---|---|---|"]
    for arm, ours, paper_delta in comparisons:
        pd = "-" if paper_delta is None else f"{paper_delta * 100:+.2f}"
        v = "-" if ours is None else verdict(ours, paper_delta)
        lines.append(f"| `{arm.name}` vs `{arm.compare_to}` | {_ci(ours)} | {pd} | {v} |")
    lines += ["", "Paper deltas from its table (arXiv 2604.13561); the 25:75 and 50:50 arms were published only as "
              "'between 71.65 and 72.02', whose midpoint is used.", ""]

    present = [a for a in SCALING_ARMS if a in finished]
    if present:
        lines += ["## Data sensitivity per finding (F1 %, mean over seeds)", "",
                  "| finding | " + " | ".join(present) + " | 100 % - 20 % |", "|---|" + "---|" * (len(present) + 1)]
        per = []
        for f in catalogue:
            vals = [stat(a, f"f1/{f.id}")[0] for a in present]
            gain = vals[-1] - vals[0] if len(vals) > 1 else math.nan
            per.append((f.id, vals, gain))
        per.sort(key=lambda r: -np.nan_to_num(r[2], nan=-9))
        for fid, vals, gain in per:
            lines.append(f"| {fid} | " + " | ".join("-" if math.isnan(v) else f"{v * 100:.1f}" for v in vals)
                         + f" | {'-' if math.isnan(gain) else f'{gain * 100:+.1f}'} |")
        lines.append("")
    levels = [f"{int(round(x * 100))}%" for x in preset.occlusion]
    lines += ["## Retrieval and occlusion (mean over seeds)", "",
              "| arm | i->r R@5 | r->i R@5 | " + " | ".join(f"F1 @ {lv} occluded" for lv in levels) + " |",
              "|---|---|---|" + "---|" * len(levels)]
    for arm in arms:
        ir = stat(arm.name, "retrieval/image_to_report/R@5")[0]
        ri = stat(arm.name, "retrieval/report_to_image/R@5")[0]
        occ = [stat(arm.name, f"occlusion/{lv}/macro_f1")[0] for lv in levels]
        lines.append(f"| `{arm.name}` | {ir * 100:.1f} | {ri * 100:.1f} | "
                     + " | ".join("-" if math.isnan(o) else f"{o * 100:.2f}" for o in occ) + " |")
    lines += ["", "Plots: `arms.png` (macro F1 per arm, mean +- std, paper values), `scaling.png` (20/40/100 % of the "
              "subset), `per_finding.png` (F1 per finding and arm), `occlusion.png` (macro F1 and R@5 under "
              "occlusion).", ""]
    return "\n".join(lines)


def _plots(preset: StudyPreset, out: Path, arms: list[Arm], stat, catalogue) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a.name for a in arms]
    # Arms with error bars; the paper's number written above each bar (its scale differs from ours).
    fig, ax = plt.subplots(figsize=(9, 4.4))
    x = np.arange(len(arms))
    means = np.array([stat(a, "macro_f1")[0] * 100 for a in names])
    stds = np.array([np.nan_to_num(stat(a, "macro_f1")[1]) * 100 for a in names])
    ax.bar(x, means, yerr=stds, capsize=4, color="#4878a8")
    top = np.nanmax(means + stds)
    for i, a in enumerate(arms):
        ax.text(i, np.nan_to_num(means[i] + stds[i]) + 0.01 * top, f"paper\n{a.paper}", ha="center", va="bottom",
                fontsize=7, color="#c44e52")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test macro F1 (%)")
    ax.set_ylim(max(0.0, np.nanmin(means - stds) - 5), top * 1.12)
    ax.set_title(f"Sampler study {preset.name}: test macro F1, 30 findings (bars: mean +- std over seeds; "
                 "red: the paper)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "arms.png", dpi=110)
    plt.close(fig)

    # Scaling curve.
    fig, ax = plt.subplots(figsize=(5, 3.6))
    fr = [20, 40, 100]
    m = [stat(a, "macro_f1")[0] * 100 for a in SCALING_ARMS]
    s = [np.nan_to_num(stat(a, "macro_f1")[1]) * 100 for a in SCALING_ARMS]
    ax.errorbar(fr, m, yerr=s, marker="o", capsize=4, label="ours")
    pp = [(f, _paper_value(ARM_BY_NAME[a].paper)) for f, a in zip(fr, SCALING_ARMS)]
    ax.plot([f for f, p in pp if p], [p * 100 for f, p in pp if p], "D--", color="#c44e52", label="paper")
    ax.set_xlabel("% of the subset")
    ax.set_ylabel("test macro F1 (%)")
    ax.set_xticks(fr)
    ax.legend(fontsize=8)
    ax.set_title("Data scaling (random sampling)")
    fig.tight_layout()
    fig.savefig(out / "scaling.png", dpi=110)
    plt.close(fig)

    # Per-finding heatmap.
    ids = catalogue.ids
    grid = np.array([[stat(a, f"f1/{f}")[0] * 100 for f in ids] for a in names])
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(names) + 2.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=100)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.set_xticks(range(len(ids)), ids, rotation=70, ha="right", fontsize=7)
    fig.colorbar(im, ax=ax, label="F1 (%)")
    ax.set_title("Per-finding test F1 (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out / "per_finding.png", dpi=110)
    plt.close(fig)

    # Occlusion curves.
    levels = [int(round(v * 100)) for v in preset.occlusion]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for a in names:
        f1 = [stat(a, f"occlusion/{lv}%/macro_f1")[0] * 100 for lv in levels]
        r5 = [stat(a, f"occlusion/{lv}%/retrieval/image_to_report/R@5")[0] * 100 for lv in levels]
        axes[0].plot(levels, f1, marker="o", label=a)
        axes[1].plot(levels, r5, marker="o", label=a)
    axes[0].set_ylabel("test macro F1 (%)")
    axes[1].set_ylabel("image->report R@5 (%)")
    for ax in axes:
        ax.set_xlabel("% of the volume occluded")
        ax.set_xticks(levels)
    axes[1].legend(fontsize=7)
    fig.suptitle("Occlusion robustness (mean over seeds)")
    fig.tight_layout()
    fig.savefig(out / "occlusion.png", dpi=110)
    plt.close(fig)


def main_study(args) -> int:
    preset = StudyPreset.load(args.preset)
    if args.aggregate_only:
        record = json.loads((Path(args.out) / "study.json").read_text())
        aggregate(preset, Path(args.out), args.seeds or record.get("seeds", preset.seeds), record,
                  progress=not args.quiet)
        return 0
    try:
        run_study(preset, args.data, args.out, seeds=args.seeds, resume=args.resume, cache_dir=args.cache,
                  jobs=args.jobs, progress=not args.quiet)
    except RuntimeError as exc:
        print(f"ct-zeroshot-train study: {exc}", file=sys.stderr)
        return 1
    return 0
