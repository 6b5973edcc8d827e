"""``ct-zeroshot-train``: the training side's command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from .research.recipe import STUDIES as RECIPE_STUDIES
from .synth.corpus import CORPUS_VERSIONS


def _pick(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The named options as keyword arguments (argparse's names are the functions' parameter names)."""
    return {n: getattr(args, n) for n in names}


def _common(args: argparse.Namespace) -> dict[str, Any]:
    """The options every long-running command takes: the volume cache and the progress bars."""
    return {"cache_dir": args.cache, "progress": not args.quiet}


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", help="auto (a GPU when PyTorch sees one; default), cpu, cuda or cuda:N; "
        "a named GPU that is not there is an error",
    )  # fmt: skip


def _synth(args: argparse.Namespace) -> int:
    from .synth.corpus import SynthConfig, generate_corpus

    cfg = SynthConfig(
        **_pick(args, "out", "studies", "seed", "profile", "dicom", "workers", "masks"), version=args.corpus_version
    )
    summary = generate_corpus(cfg, progress=not args.quiet)
    print(json.dumps(summary, indent=1))
    print(f"per-finding prevalence: {args.out}/prevalence.md; montage: {summary['montage']}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .train import train

    cfg = TrainConfig.load(args.preset, args.overrides)
    summary = train(args.data, args.out, cfg, stop_after=args.stop_after, strict=args.strict, **_common(args))
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        print(json.dumps(summary, indent=1))
    return 0


def _pretrain_image(args: argparse.Namespace) -> int:
    from .config import TrainConfig
    from .research.pretrain import INIT_FILE, pretrain_image

    cfg = TrainConfig.load(args.preset, args.overrides)
    summary = pretrain_image(args.data, args.out, cfg, stop_after=args.stop_after, **_common(args))
    print(json.dumps(summary, indent=1))
    if summary["finished"]:
        print(f"image init: {args.out}/{INIT_FILE} (train ... image.init={args.out}/{INIT_FILE})")
    return 0


def _recipe(args: argparse.Namespace) -> int:
    from .research.recipe import run_recipe

    result = run_recipe(
        args.out,
        args.preset,
        args.overrides,
        **_pick(args, "data", "studies", "seed", "corpus_version"),
        supervised=not args.no_supervised,
        reference=args.reference,
        **_common(args),
    )
    print(json.dumps(result, indent=1))
    print(f"\nrecipe: {args.out}/recipe.json")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate_run import evaluate_run

    metrics_path, text = evaluate_run(
        args.run, args.data, **_pick(args, "split", "checkpoint", "device", "findings", "labels"), **_common(args)
    )
    print(text)
    print(f"\nmetrics: {metrics_path}")
    return 0


def _probe(args: argparse.Namespace) -> int:
    from .research.probe import probe_run

    options = _pick(args, "checkpoint", "split", "train_limit", "supervised_steps", "supervised_seeds", "device")
    options["supervised_unlabelled_variant"] = args.unlabelled_variant
    path, text = probe_run(args.run, args.data, **options, **_common(args))
    print(text)
    print(f"\nprobe: {path}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from operators.contract.package import load_package

    from .export import export_run

    options = _pick(args, "checkpoint", "thresholds", "name", "text", "auroc_floor", "intended_use", "device")
    export_run(args.run, args.out, args.data, version=args.model_version, **options, **_common(args))
    pkg = load_package(args.out)  # the deploy side's loader must accept what was written
    print(
        f"model package {pkg.root}: {pkg.name} {pkg.version}, {len(pkg.catalogue)} findings, "
        f"thresholds: {pkg.threshold_method}"
    )
    return 0


def _encode_prompts(args: argparse.Namespace) -> int:
    from .encode_prompts import encode_prompts

    tower = _pick(args, "run", "checkpoint", "text_model")
    encode_prompts(args.package, args.findings, args.out, mode=args.findings_mode, **tower)
    return 0


def _convert_merlin(args: argparse.Namespace) -> int:
    from operators.contract.package import load_package

    from .convert_merlin import convert_merlin

    convert_merlin(args.checkpoint, args.out, args.text_model, text=args.text)
    pkg = load_package(args.out)
    print(
        f"model package {pkg.root}: {pkg.name} {pkg.version}; text encoder: "
        f"{'ONNX' if pkg.text_encoder else 'not shipped (prompt embeddings only)'}"
    )
    return 0


def _heldout(args: argparse.Namespace) -> int:
    from .heldout import evaluate_heldout, save_evaluation, write_evaluation_md

    evaluation = evaluate_heldout(
        args.package, args.data, args.development, args.out, device=args.device, progress=not args.quiet
    )
    if args.report:
        command = (
            f"ct-zeroshot-train heldout --package {args.package} --data {args.data} "
            f"--development {args.development} --out {args.out} --report {args.report}"
        )
        save_evaluation(evaluation, f"{args.report}.json")
        print(f"report: {write_evaluation_md(evaluation, f'{args.report}.md', command)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate_package

    calibrate_package(
        args.package,
        args.data,
        args.out,
        split=args.split,
        evaluate=args.evaluate,
        device=args.device,
        progress=not args.quiet,
    )
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from .quantize import quantize_package

    quantize_package(
        args.package,
        args.data,
        args.out,
        studies=args.studies,
        split=args.split,
        check=args.check,
        check_studies=args.check_studies,
        evaluate=args.evaluate,
        progress=not args.quiet,
        max_changed=args.max_decisions_changed,
        stem=args.stem,
    )
    return 0


def _add_text_encoder(args: argparse.Namespace) -> int:
    from .text_package import add_text_encoder

    add_text_encoder(
        args.package,
        args.run,
        args.out,
        quantize=None if args.quantize == "none" else args.quantize,
        data=args.data,
        studies=args.studies,
        checkpoint=args.checkpoint,
    )
    return 0


def _pointing(args: argparse.Namespace) -> int:
    from .pointing import pointing_game, write_pointing

    result = pointing_game(
        args.package,
        args.data,
        split=None if args.split == "all" else args.split,
        limit=args.limit,
        progress=not args.quiet,
        method=args.method,
    )
    out = write_pointing(result, args.out)
    m = result["macro_focal"]
    if m["hit_rate"] is None:
        print(f"no focal finding among {result['cases']} cases; {out}")
    else:
        mass = (
            ""
            if m["mass_share"] is None
            else f"; map mass in the lesion {m['mass_share']:.3f} ({m['mass_over_random']:.2f}x)"
        )
        print(
            f"pointing game ({args.method}), {m['findings']} focal findings over {result['cases']} cases: hit rate "
            f"{m['hit_rate']:.3f} vs a random point in the body {m['random_rate']:.3f} ({m['hit_over_random']:.2f}x)"
            f"{mass}; {out} and {out.with_suffix('.md')}"
        )
    return 0


def _lesion_occlusion(args: argparse.Namespace) -> int:
    from .lesion_occlusion import lesion_occlusion, write_lesion_occlusion

    result = lesion_occlusion(
        args.package,
        args.data,
        split=None if args.split == "all" else args.split,
        limit=args.limit,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = write_lesion_occlusion(result, args.out)
    m = result["macro_focal"]
    if m["lesion_effect"] is None:
        print(f"no focal finding with a control site among {result['studies']} studies; {out}")
    else:
        print(
            f"lesion-site occlusion, {m['findings']} focal findings over {result['cases']} cases: score drop with the "
            f"lesion hidden {m['drop_lesion_hidden']:+.2f} points, with the same volume hidden elsewhere "
            f"{m['drop_control']:+.2f}; lesion effect {m['lesion_effect']:+.2f} points, above zero for "
            f"{len(m['effect_above_zero'])} findings; {out} and {out.with_suffix('.md')}"
        )
    return 0


def _study(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .research.study import StudyPreset, aggregate, run_study

    preset = StudyPreset.load(args.preset, args.overrides)
    if args.seed_level_only:
        from .research.study.seed_level import write_seed_level

        print(write_seed_level(preset, Path(args.out)))
        return 0
    if args.aggregate_only:
        record = json.loads((Path(args.out) / "study.json").read_text())
        aggregate(
            preset, Path(args.out), args.seeds or record.get("seeds", preset.seeds), record, progress=not args.quiet
        )
        return 0
    try:
        arms = None
        if args.arms:
            from .research.study.arms import MAIN_ARMS

            arms = list(MAIN_ARMS) if args.arms == "main" else [a.strip() for a in args.arms.split(",") if a.strip()]
        run_study(preset, args.data, args.out, arms=arms, **_pick(args, "seeds", "resume", "jobs"), **_common(args))
    except RuntimeError as exc:
        print(f"ct-zeroshot-train study: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    from operators import __version__

    p = argparse.ArgumentParser(prog="ct-zeroshot-train", description=(__doc__ or "").replace("``", ""))
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="generate the synthetic abdominal CT corpus (Merlin release format)")
    s.add_argument("out", help="output folder (new or empty)")
    s.add_argument("--studies", type=int, default=200, help="number of studies (default 200)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--profile",
        choices=["tiny", "full"],
        default="tiny",
        help="tiny: ~5 mm voxels for CPU training; full: 512x512 clinical geometry",
    )
    s.add_argument("--dicom", action="store_true", help="also write a CT Image Storage series per study")
    s.add_argument(
        "--masks",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each present finding's lesion mask: lesion_masks/ (NIfTI), dicom_seg/ with --dicom (default: on)",
    )
    s.add_argument(
        "--workers",
        type=int,
        default=min(os.cpu_count() or 1, 8),
        help="worker processes (default: all cores; the output does not depend on it)",
    )
    s.add_argument(
        "--corpus-version",
        type=int,
        default=1,
        choices=list(CORPUS_VERSIONS),
        help=(
            "phantom version: 1 as first published; 2 draws the small focal findings larger; "
            "3 makes every focal finding span several 5 mm voxels; 4 varies anatomy, habitus and scanner and "
            "paints lesions at their reports' sizes (docs/corpus.md)"
        ),
    )
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_synth)

    t = sub.add_parser("train", help="train a dual encoder (symmetric InfoNCE, alternating section batches)")
    t.add_argument("--data", required=True, help="Merlin-format folder or manifest CSV")
    t.add_argument("--out", required=True, help="run folder (an existing run is resumed)")
    t.add_argument(
        "--preset", default="cpu-tiny", help="preset name (cpu-tiny, cpu-base, cpu-small, merlin) or a YAML file"
    )
    t.add_argument("--cache", default=None, help="preprocessed-volume cache (default ~/.cache/ct-zeroshot/volumes)")
    t.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    t.add_argument(
        "--strict", action="store_true", help="refuse the data set at its first bad row or unreadable image "
        "(default: leave them out and list them in RUN/data_report.json)",
    )  # fmt: skip
    t.add_argument("--quiet", action="store_true")
    t.add_argument("overrides", nargs="*", help="config overrides, e.g. train.steps=200 sampler.ratio=25:75")
    t.set_defaults(func=_train)

    pi = sub.add_parser(
        "pretrain-image",
        help="self-supervised image pretext on the training volumes (two-view InfoNCE); writes image_init.pt",
    )
    pi.add_argument("--data", required=True, help="Merlin-format folder or manifest CSV (training volumes only)")
    pi.add_argument("--out", required=True, help="pretext folder (an existing one is resumed)")
    pi.add_argument("--preset", default="cpu-small", help="preset whose image tower and pretrain.* to use")
    pi.add_argument("--cache", default=None)
    pi.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (resume later)")
    pi.add_argument("--quiet", action="store_true")
    pi.add_argument("overrides", nargs="*", help="config overrides, e.g. pretrain.steps=200")
    pi.set_defaults(func=_pretrain_image)

    rc = sub.add_parser(
        "recipe", help="the CPU recipe end to end (corpus, pretext, train, evaluate, reference, export), timed"
    )
    rc.add_argument("--out", required=True, help="recipe folder: corpus/, pretext/, run/, package/, recipe.json")
    rc.add_argument("--preset", default="cpu-small")
    rc.add_argument("--data", default=None, help="an existing corpus (default: generate one in OUT/corpus)")
    rc.add_argument(
        "--studies", type=int, default=RECIPE_STUDIES, help="studies in the generated corpus (default %(default)s)"
    )
    rc.add_argument("--seed", type=int, default=0, help="seed of the generated corpus")
    rc.add_argument("--corpus-version", type=int, default=3, choices=list(CORPUS_VERSIONS))
    rc.add_argument("--no-supervised", action="store_true", help="skip the supervised reference")
    rc.add_argument(
        "--reference",
        default=None,
        help="with --no-supervised: a probe.json of the same image tower, steps and corpus (e.g. results/recipe/"
        "probe.json) whose supervised macro AUROC the gap is measured against",
    )
    rc.add_argument("--cache", default=None)
    rc.add_argument("--quiet", action="store_true")
    rc.add_argument("overrides", nargs="*", help="config overrides")
    rc.set_defaults(func=_recipe)

    e = sub.add_parser("evaluate", help="zero-shot F1/AUROC, retrieval and occlusion robustness of a run")
    e.add_argument("--run", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=["train", "validation", "test"])
    e.add_argument(
        "--checkpoint", default="best", choices=["best", "last", "init"], help="init = the same model before training"
    )
    e.add_argument("--cache", default=None)
    e.add_argument(
        "--findings", default=None, help="a site's findings file (YAML) to evaluate instead of the catalogue"
    )
    e.add_argument(
        "--labels", default=None, help="with --findings: CSV of 'study id' and one 1/0/-1 column per finding id"
    )
    e.add_argument("--quiet", action="store_true")
    _device_option(e)
    e.set_defaults(func=_evaluate)

    pr = sub.add_parser(
        "probe",
        help="zero-shot AUROC beside a linear probe of the image embeddings and "
        "(optionally) a supervised image tower of the same budget",
    )
    pr.add_argument("--run", required=True)
    pr.add_argument("--data", required=True)
    pr.add_argument(
        "--split",
        default="validation",
        choices=["validation", "test"],
        help="where AUROC is measured (default validation: what a decision may read; test to report)",
    )
    pr.add_argument("--checkpoint", default="best", choices=["best", "last", "init"])
    pr.add_argument(
        "--train-limit",
        type=int,
        default=None,
        help="fit the probe (and the supervised reference) on the first N training studies",
    )
    pr.add_argument(
        "--supervised-steps",
        type=int,
        default=0,
        help="also train the run's image architecture with BCE on the report labels for N steps",
    )
    pr.add_argument(
        "--supervised-seeds", type=int, default=1, help="seeds of the supervised reference (its column: their mean)"
    )
    pr.add_argument(
        "--unlabelled-variant",
        action="store_true",
        help="also a supervised reference that trains the -1 (not mentioned) labels as 0",
    )
    pr.add_argument("--cache", default=None)
    pr.add_argument("--quiet", action="store_true")
    _device_option(pr)
    pr.set_defaults(func=_probe)

    x = sub.add_parser("export", help="export a run to a model package (ONNX encoders, prompts, manifest)")
    x.add_argument("--run", required=True)
    x.add_argument("--out", required=True, help="package folder (new or empty)")
    x.add_argument(
        "--data", required=True, help="the run's data set: test split = parity inputs, validation split = thresholds"
    )
    x.add_argument("--checkpoint", default="best", choices=["best", "last", "init"])
    x.add_argument(
        "--thresholds",
        default="merlin",
        choices=["merlin", "validation"],
        help="merlin: 0.5 for every finding; validation: per-finding F1-optimal on the validation split "
        "(at most 1.5 calls per validation positive), findings below --auroc-floor not assessed",
    )
    x.add_argument(
        "--auroc-floor",
        type=float,
        default=0.65,
        help="with --thresholds validation: a finding whose validation AUROC is below this is never reported "
        "present (the manifest, SRs and summaries say 'not assessed'); default 0.65",
    )
    x.add_argument(
        "--text",
        default="auto",
        choices=["auto", "onnx", "none"],
        help="text encoder: auto = ONNX if parity holds, else prompt embeddings only",
    )
    x.add_argument("--name", default=None, help="model name in the manifest")
    x.add_argument("--model-version", default="0.1.0")
    x.add_argument(
        "--intended-use",
        default=None,
        help="what the model is for, stated in the package and every SR (default for the synthetic corpus: "
        "research and testing only, it knows phantoms)",
    )
    x.add_argument("--cache", default=None)
    x.add_argument("--quiet", action="store_true")
    _device_option(x)
    x.set_defaults(func=_export)

    st = sub.add_parser("study", help="the paper's sampler study: every arm x K seeds, statistics, plots")
    st.add_argument(
        "--preset",
        default="paper-cpu",
        help="study preset (paper-cpu, paper-merlin, smoke) or a YAML file (default paper-cpu)",
    )
    st.add_argument("--data", required=True, help="Merlin-format folder or manifest CSV")
    st.add_argument("--out", required=True, help="study folder: results.csv, summary.md, plots, runs/")
    st.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: the preset's, 3)")
    st.add_argument(
        "overrides", nargs="*", help="training config overrides for every arm, added to the preset's "
        "(paper-merlin needs text.model=DIR)",
    )  # fmt: skip
    st.add_argument("--resume", action="store_true", help="continue a study in --out, skipping finished runs")
    st.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at a time (default: the preset's; 0: the cores // the preset's threads per run)",
    )
    st.add_argument(
        "--seed-level-only",
        action="store_true",
        help="only write seed_level.md (per-seed t-intervals, Holm) from --out's results.csv",
    )
    st.add_argument(
        "--aggregate-only",
        action="store_true",
        help="only rewrite results.csv, summary.md and plots from the finished runs",
    )
    st.add_argument(
        "--arms",
        help="run only these arms (comma-separated), or 'main': the arms of the main contrasts (e.g. with "
        "--resume --seeds 10); the others keep the seeds they have",
    )
    st.add_argument("--cache", default=None)
    st.add_argument("--quiet", action="store_true")
    st.set_defaults(func=_study)

    ho = sub.add_parser(
        "heldout",
        help="a package's headline figures, once, on a held-out corpus with its own seed (ground truth, "
        "no-image baseline); writes a copy of the package with them in its manifest",
    )
    ho.add_argument("--package", required=True, help="the model package (left untouched)")
    ho.add_argument("--data", required=True, help="the held-out corpus (ct-zeroshot-train synth, its own seed)")
    ho.add_argument("--development", required=True, help="the corpus the model was developed on (baseline fit)")
    ho.add_argument("--out", required=True, help="the evaluated package (a new folder)")
    ho.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ho.add_argument("--report", help="also write REPORT.json and REPORT.md (the docs' table)")
    ho.add_argument("--quiet", action="store_true")
    ho.set_defaults(func=_heldout)

    ca = sub.add_parser(
        "calibrate",
        help="fit each finding's certainty (Platt scaling) on a labelled split; writes a copy of the package "
        "whose SRs state calibrated probabilities",
    )
    ca.add_argument("--package", required=True, help="the model package (left untouched)")
    ca.add_argument("--data", required=True, help="a labelled corpus (Merlin format) with the split to fit on")
    ca.add_argument("--split", default="validation", help="the split fitted on (default validation)")
    ca.add_argument("--out", required=True, help="the calibrated package (a new folder)")
    ca.add_argument("--evaluate", help="also score this corpus (held-out) and report raw vs calibrated")
    ca.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    ca.add_argument("--quiet", action="store_true")
    ca.set_defaults(func=_calibrate)

    qz = sub.add_parser(
        "quantize",
        help="an int8 image encoder for CPU servers (ONNX Runtime static QDQ quantisation, calibrated on "
        "training studies); checked against the float package, written as a copy",
    )
    qz.add_argument("--package", required=True, help="the float model package (left untouched)")
    qz.add_argument("--data", required=True, help="a corpus (Merlin format): calibration and check studies")
    qz.add_argument("--out", required=True, help="the int8 package (a new folder)")
    qz.add_argument("--studies", type=int, default=128, help="calibration studies, spread over the split (default 128)")
    qz.add_argument("--split", default="train", help="the split calibrated on (default train)")
    qz.add_argument("--check", default="validation", help="the split the int8 decisions are checked on")
    qz.add_argument("--check-studies", type=int, default=None, help="at most this many check studies (default all)")
    qz.add_argument("--evaluate", help="also compare float and int8 on this corpus (held-out), every study")
    qz.add_argument(
        "--max-decisions-changed",
        type=float,
        default=0.01,
        help="refuse the int8 encoder when it changes more than this share of the check split's decisions (0.01)",
    )
    qz.add_argument(
        "--stem",
        default="float",
        choices=["float", "int8"],
        help="the first convolution float (default: closer to the float model) or int8 (faster; check the decisions)",
    )
    qz.add_argument("--quiet", action="store_true")
    qz.set_defaults(func=_quantize)

    at = sub.add_parser(
        "add-text-encoder",
        help="give a prompts-only package its run's text encoder (ONNX, int8 by default), so that a site's "
        "own findings can be encoded where it is deployed; writes a copy of the package",
    )
    at.add_argument("--package", required=True, help="the model package (left untouched)")
    at.add_argument("--run", required=True, help="the training run the package was exported from")
    at.add_argument("--checkpoint", default="best", help="the run's checkpoint the package came from (default best)")
    at.add_argument("--out", required=True, help="the package with its text encoder (a new folder)")
    at.add_argument("--quantize", default="int8", choices=["int8", "none"], help="int8 weights (default) or float")
    at.add_argument("--data", help="the run's corpus: the decisions int8 prompts change on its validation split")
    at.add_argument("--studies", type=int, default=200, help="validation studies for that measure (default 200)")
    at.set_defaults(func=_add_text_encoder)

    pg = sub.add_parser(
        "pointing",
        help="the pointing game: do a package's localisation maps point at the lesion (a corpus with lesion masks)",
    )
    pg.add_argument(
        "--package", required=True, help="a model package (with the localisation output for --method features)"
    )
    pg.add_argument(
        "--method",
        default="features",
        choices=["features", "occlusion"],
        help="the package's localisation maps (default), or the occlusion search: the place whose occlusion "
        "lowers the finding's margin most (any package; several hundred encoder passes a study)",
    )
    pg.add_argument("--data", required=True, help="a synthetic corpus written with lesion masks (a fresh seed)")
    pg.add_argument("--split", default="test", help="the split to play on, or 'all' (default test)")
    pg.add_argument("--limit", type=int, default=None, help="at most this many studies")
    pg.add_argument("--out", required=True, help="the result JSON (a markdown table beside it)")
    pg.add_argument("--quiet", action="store_true")
    pg.set_defaults(func=_pointing)

    lo = sub.add_parser(
        "lesion-occlusion",
        help="lesion-site occlusion: a finding's score with its lesion hidden vs the same volume hidden elsewhere",
    )
    lo.add_argument("--package", required=True, help="a model package")
    lo.add_argument("--data", required=True, help="a synthetic corpus written with lesion masks")
    lo.add_argument("--split", default="test", help="the split, or 'all' (default test)")
    lo.add_argument("--limit", type=int, default=None, help="at most this many studies")
    lo.add_argument("--seed", type=int, default=0, help="the control sites' random shifts (default 0)")
    lo.add_argument("--out", required=True, help="the result JSON (a markdown table beside it)")
    lo.add_argument("--quiet", action="store_true")
    lo.set_defaults(func=_lesion_occlusion)

    c = sub.add_parser("convert-merlin", help="official Merlin checkpoint -> model package")
    c.add_argument("--checkpoint", required=True, help="Merlin's .pt (flat state dict)")
    c.add_argument("--out", required=True, help="package folder (new or empty)")
    c.add_argument(
        "--text-model", required=True, help="local folder with Clinical-Longformer's config.json and tokenizer files"
    )
    c.add_argument(
        "--text",
        default="none",
        choices=["auto", "onnx", "none"],
        help="text encoder to ONNX: none (default: Longformer exports poorly; prompt embeddings only), "
        "auto (try, keep if parity holds), onnx (fail without it)",
    )
    c.set_defaults(func=_convert_merlin)
    help_ep = "a findings file encoded by the torch text tower into a copy of a package without a text encoder"
    ep = sub.add_parser("encode-prompts", help=help_ep)
    ep.add_argument("--package", required=True, help="the model package (left untouched)")
    ep.add_argument("--findings", required=True, help="findings file (YAML; see `ct-zeroshot findings check`)")
    ep.add_argument("--out", required=True, help="the new package folder (new or empty)")
    ep.add_argument("--findings-mode", default="add", choices=["add", "replace"])
    ep.add_argument("--run", help="the ct-zeroshot training run the package was exported from")
    ep.add_argument("--checkpoint", help="Merlin's checkpoint the package was converted from")
    ep.add_argument("--text-model", help="with --checkpoint: Clinical-Longformer's config and tokenizer folder")
    ep.set_defaults(func=_encode_prompts)
    return p


def main(argv: list[str] | None = None) -> int:
    from operators.cli import run_command

    return run_command(build_parser(), argv, (FileExistsError, FileNotFoundError, ValueError, KeyError))


if __name__ == "__main__":
    sys.exit(main())
