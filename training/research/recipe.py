"""``ct-zeroshot-train recipe``: the CPU recipe end to end, from a fresh corpus to a model package, timed.

Stages, each timed (wall seconds): the synthetic corpus (unless ``--data`` names one), the image
pretext when the preset asks for it (``image.init: pretext``), training, evaluation on the test
split, the supervised reference of the same image tower and budget (``probe``), and the export with
validation thresholds. ``OUT/recipe.json`` (written last) holds the times, the test metrics and the
learning issue's bars with whether each was met; nothing in it is typed in by hand.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from operators.contract.files import write_json

from ..config import TrainConfig

PRETEXT = "pretext"  # image.init value: run the image pretext first and start from its tower
STUDIES = 12000  # the generated corpus (docs/training.md, the CPU recipe)
SUPERVISED_SEEDS = 3  # the supervised reference's seeds (its AUROC: their mean)
BARS = {"test_macro_auroc": 0.85, "test_macro_f1_package": 0.60, "max_gap_to_supervised": 0.05, "minutes": 30.0}


def check_reference(ref: dict, path, cfg: TrainConfig, data) -> None:
    """A supervised reference measures the gap only for the same image tower, step count and corpus: a
    probe of another is refused, naming what differs. A probe that records no corpus identity (written
    before probes kept one) is matched by its training and test split sizes."""
    from ..data import load_studies
    from .probe import corpus_identity

    meta = ref.get("meta", {})
    if "supervised" not in ref.get("macro_auroc", {}):
        raise ValueError(f"--reference {path}: holds no supervised reference (probe --supervised-steps N)")
    problems = []
    if meta.get("arch") != cfg.image.arch:
        problems.append(f"image tower {meta.get('arch')!r}, the recipe's is {cfg.image.arch!r}")
    if meta.get("supervised_steps") != cfg.train.steps:
        problems.append(f"{meta.get('supervised_steps')} supervised steps, the recipe trains {cfg.train.steps}")
    if meta.get("split") != "test":
        problems.append(f"measured on split {meta.get('split')!r}, the recipe reports on 'test'")
    ours = corpus_identity(data)
    if meta.get("corpus") is not None or ours is None:
        if meta.get("corpus") != ours:
            problems.append(f"corpus {meta.get('corpus')}, the recipe's is {ours}")
    else:
        studies = load_studies(data, check_images=False)
        sizes = (sum(s.split == "train" for s in studies), sum(s.split == "test" for s in studies))
        if (meta.get("train_studies"), meta.get("test_studies")) != sizes:
            problems.append(
                f"a corpus of {meta.get('train_studies')} training / {meta.get('test_studies')} test studies, the "
                f"recipe's has {sizes[0]} / {sizes[1]}"
            )
    if problems:
        raise ValueError(f"--reference {path}: not a reference for this recipe: " + "; ".join(problems))


def run_recipe(
    out: str | Path,
    preset: str,
    overrides: list[str],
    data: str | Path | None = None,
    studies: int = STUDIES,
    seed: int = 0,
    corpus_version: int = 3,
    cache_dir: str | Path | None = None,
    supervised: bool = True,
    reference: str | Path | None = None,
    progress: bool = True,
) -> dict:
    if reference is not None and supervised:
        raise ValueError("recipe: --reference replaces the supervised stage; give it with --no-supervised")
    if reference is not None:  # read before the stages run: a wrong path fails in seconds, not after 30 minutes
        ref = json.loads(Path(reference).read_text())
        ref_probe = ref["macro_auroc"]
    from ..evaluate_run import evaluate_run
    from ..export import export_run
    from ..synth.corpus import SynthConfig, generate_corpus
    from ..train import train
    from .pretrain import INIT_FILE, pretrain_image
    from .probe import probe_run

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def timed(name, fn, *a, **kw):
        t = time.perf_counter()
        result = fn(*a, **kw)
        seconds[name] = round(time.perf_counter() - t, 1)
        if progress:
            print(f"recipe: {name} done in {seconds[name] / 60:.1f} min", flush=True)
        return result

    if data is None:
        data = out / "corpus"
        if not (data / "corpus.json").exists():
            cfg_c = SynthConfig(out=str(data), studies=studies, seed=seed, workers=2, version=corpus_version)
            timed("corpus", generate_corpus, cfg_c, progress=progress)
    cfg = TrainConfig.load(preset, overrides)
    if reference is not None:
        check_reference(ref, reference, cfg, data)
    if cfg.image.init == PRETEXT:
        pre = out / "pretext"
        timed("pretrain_image", pretrain_image, data, pre, cfg, cache_dir=cache_dir, progress=progress)
        cfg = TrainConfig.load(preset, [*overrides, f"image.init={pre / INIT_FILE}"])
    run = out / "run"
    timed("train", train, data, run, cfg, cache_dir=cache_dir, progress=progress)
    timed("evaluate", evaluate_run, run, data, cache_dir=cache_dir, progress=progress)
    if supervised:
        timed(
            "supervised_reference",
            probe_run,
            run,
            data,
            split="test",
            supervised_steps=cfg.train.steps,
            supervised_seeds=SUPERVISED_SEEDS,
            cache_dir=cache_dir,
            progress=progress,
        )
    pkg = out / "package"
    timed(
        "export",
        export_run,
        run,
        pkg,
        data,
        thresholds="validation",
        cache_dir=cache_dir,
        progress=progress,
        log=(print if progress else (lambda _m: None)),
    )

    metrics = json.loads((run / "metrics.json").read_text())["zero_shot"]
    manifest = json.loads((pkg / "manifest.json").read_text())
    with_thr = manifest["provenance"]["metrics"].get("test_with_package_thresholds", {})
    result = {
        "preset": preset,
        "overrides": overrides,
        "data": str(data),
        "config_digest": cfg.digest(),
        "seconds": seconds,
        # the recipe's own time: the supervised reference is a yardstick, not a stage of the recipe
        "minutes_total": round(sum(v for k, v in seconds.items() if k != "supervised_reference") / 60, 1),
        "test_macro_auroc": metrics["macro_auroc"],
        "test_macro_f1_merlin_rule": metrics["macro_f1"],
        "test_macro_f1_package": with_thr.get("macro_f1"),
        "test_macro_f1_package_assessed_findings": with_thr.get("macro_f1_assessed_findings"),
        "findings_not_assessed": with_thr.get("findings_not_assessed"),
        "calls_per_true_positive": with_thr.get("calls_per_true_positive"),
    }
    if supervised or reference is not None:
        probe = json.loads((run / "probe.json").read_text())["macro_auroc"] if supervised else ref_probe
        result.update(
            supervised_macro_auroc=probe["supervised"],
            supervised_reference=str(run / "probe.json") if supervised else str(reference),
            gap_to_supervised=probe["supervised"] - metrics["macro_auroc"],
        )
        if supervised:
            result["linear_probe_macro_auroc"] = probe["linear_probe"]
    result["bars"] = {
        "test_macro_auroc >= 0.85": result["test_macro_auroc"] >= BARS["test_macro_auroc"],
        "test_macro_f1_package >= 0.60": (result["test_macro_f1_package"] or 0) >= BARS["test_macro_f1_package"],
    }
    # the 30-minute bar is for corpus to package: without the corpus stage (--data) it is not measured
    if "corpus" in seconds:
        result["bars"]["minutes_total <= 30"] = result["minutes_total"] <= BARS["minutes"]
    else:
        result["bars"]["minutes_total <= 30"] = None
        result["bars_not_measured"] = {"minutes_total <= 30": "the corpus stage was skipped (--data named a corpus)"}
    if "gap_to_supervised" in result:
        result["bars"]["gap_to_supervised <= 0.05"] = result["gap_to_supervised"] <= BARS["max_gap_to_supervised"]
    write_json(out / "recipe.json", result)
    return result
