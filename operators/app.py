"""The MONAI Deploy application: DICOM studies in, one Comprehensive 3D SR (TID 1500) per study out.

    study loader -> series selector -> series to tensor -> zero-shot -> SR writer

Run it as ``python -m operators -i IN -o OUT -m MODELS`` or inside the MAP, where the paths come from
``HOLOSCAN_INPUT_PATH``, ``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH`` (flags win, then the
variables, then ``input``, ``output``, ``models``). ``MODELS`` is a model package, or a folder holding
exactly one (the MAP's ``/opt/holoscan/models/<name>``). A named model that is missing or does not load
ends the run with exit status 2; only when no model is named at all is the embedded demo model used (it
knows synthetic phantoms, not patients), and the log and every SR say so. ``--device cuda`` without a CUDA
provider that loads is an error too; ``--device auto`` takes the CPU then, and the log and the SRs say which
device ran.

The input is any folder tree of DICOM files holding one or more studies. Studies that cannot be
processed end with a log line naming the study and the reason and get no SR; the exit status is
non-zero only when no study at all could be processed (or the model cannot be loaded).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .contract.custom_findings import FindingsFileError
from .contract.dicom_series import scan_tree
from .contract.package import MANIFEST, PackageError, load_package, named_or_demo
from .contract.phi import allow_identifiers, identifiers_allowed
from .contract.scoring import DEVICES, DeviceError, ZeroShotModel
from .contract.volume import VolumeError
from .pipeline import SeriesToModelInput, StudyWork, log_model

log = logging.getLogger("ct-zeroshot")


def find_package(models: Path | None) -> Path:
    """The package in ``models`` (itself, or its one sub-folder with a manifest); the embedded demo model
    only when no model is named (``models`` is None). A named path that does not exist is refused."""
    if models is None:
        return named_or_demo(None)
    if not models.exists():
        raise PackageError(f"{models}: model path does not exist")
    if (models / MANIFEST).is_file():
        return models
    found = sorted(p.parent for p in models.glob(f"*/{MANIFEST}"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise PackageError(f"{models}: no model package here (no {MANIFEST} in it or in a sub-folder)")
    raise PackageError(
        f"{models}: holds {len(found)} model packages ({', '.join(p.name for p in found)}); pass one of them with -m"
    )


def discover(input_path: Path) -> list[StudyWork]:
    """Every study under ``input_path`` (headers only); unreadable files are logged by name."""
    scan = scan_tree(input_path)
    for path, why in scan.unreadable:
        log.warning("%s: skipped: %s", path, why)
    return [StudyWork(uid, series) for uid, series in sorted(scan.studies().items())]


def build_app(studies: list[StudyWork], model: ZeroShotModel, output: Path, results: list[StudyWork]):
    from monai.deploy.conditions import CountCondition
    from monai.deploy.core import Application

    from .ops.series_selector import SeriesSelectorOperator
    from .ops.series_to_volume import SeriesToTensorOperator
    from .ops.sr_writer import SRWriterOperator
    from .ops.study_loader import StudyLoaderOperator
    from .ops.zero_shot import ZeroShotOperator

    class CTZeroShotApp(Application):
        """Zero-shot findings on abdominal CT as DICOM SR."""

        name = "ct-zeroshot"
        description = __doc__

        def compose(self):
            loader = StudyLoaderOperator(self, CountCondition(self, len(studies)), studies=studies, name="study_loader")
            selector = SeriesSelectorOperator(self, name="series_selector")
            tensor = SeriesToTensorOperator(
                self, preprocessor=SeriesToModelInput(model.package.spec), name="series_to_tensor"
            )
            zero_shot = ZeroShotOperator(self, model=model, name="zero_shot")
            writer = SRWriterOperator(self, model=model, output_folder=output, results=results, name="sr_writer")
            self.add_flow(loader, selector, {("study", "study")})
            self.add_flow(selector, tensor, {("selected_series", "selected_series")})
            self.add_flow(tensor, zero_shot, {("model_input", "model_input")})
            self.add_flow(zero_shot, writer, {("findings", "findings")})

    return CTZeroShotApp()


def resolve_paths(args: argparse.Namespace) -> tuple[Path, Path, Path | None]:
    env = os.environ
    inp = args.input or env.get("HOLOSCAN_INPUT_PATH") or "input"
    out = args.output or env.get("HOLOSCAN_OUTPUT_PATH") or "output"
    models = args.model or env.get("HOLOSCAN_MODEL_PATH")
    if models is None and Path("models").exists():
        models = "models"
    return Path(inp), Path(out), Path(models) if models else None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m operators", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-i", "--input", help="DICOM folder tree (default: $HOLOSCAN_INPUT_PATH or ./input)")
    p.add_argument("-o", "--output", help="SR output folder (default: $HOLOSCAN_OUTPUT_PATH or ./output)")
    p.add_argument(
        "-m",
        "--model",
        "--models",
        dest="model",
        help="model package or a folder with one (default: $HOLOSCAN_MODEL_PATH, ./models, "
        "else the embedded demo model)",
    )
    p.add_argument("-w", "--workdir", help="accepted for MAP compatibility; nothing is written there")
    p.add_argument(
        "-l",
        "--log-level",
        default=os.environ.get("HOLOSCAN_LOG_LEVEL", "INFO"),
        type=str.upper,
        choices=["DEBUG", "INFO", "WARN", "WARNING", "ERROR"],
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=DEVICES,
        help="the image encoder's device (auto: CUDA when its provider loads, else the CPU; openvino: OpenVINO's "
        "CPU runtime, an int8 package's fast path)",
    )
    p.add_argument(
        "--log-patient-identifiers",
        action="store_true",
        help="let third-party exception texts, which may quote header values (PHI), into logs and reasons",
    )
    add_findings_arguments(p)
    add_maps_argument(p)
    return p


def add_maps_argument(p: argparse.ArgumentParser) -> None:
    """``--maps/--no-maps`` (default from ``CT_ZEROSHOT_MAPS``, for the MAP layout: true or false; unset:
    maps when the model package has the output)."""
    env = os.environ.get("CT_ZEROSHOT_MAPS", "").strip().lower()
    if env not in ("", "true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"CT_ZEROSHOT_MAPS={env!r}: expected true or false")
    p.add_argument(
        "--maps",
        action=argparse.BooleanOptionalAction,
        default=None if not env else env in ("true", "1", "yes"),
        help="a localisation map for each present finding, as a DICOM SEG beside the SR and referenced from it "
        "(default: when the model package has them; --maps refuses a package without; $CT_ZEROSHOT_MAPS)",
    )


def add_findings_arguments(p: argparse.ArgumentParser) -> None:
    """``--findings FILE --findings-mode add|replace`` (defaults from ``CT_ZEROSHOT_FINDINGS`` and
    ``CT_ZEROSHOT_FINDINGS_MODE``, for the MAP layout): a site's own findings, written as prompts."""
    p.add_argument(
        "--findings",
        default=os.environ.get("CT_ZEROSHOT_FINDINGS") or None,
        help="a findings file (YAML: id, display, positive/negative prompts, optional code and threshold) "
        "scored with the model's findings (default: $CT_ZEROSHOT_FINDINGS)",
    )
    p.add_argument(
        "--findings-mode",
        default=os.environ.get("CT_ZEROSHOT_FINDINGS_MODE", "add"),
        choices=["add", "replace"],
        help="add: the file's findings after the model's own (default); replace: the file's findings only",
    )


def run(argv: list[str] | None = None) -> tuple[int, list[StudyWork]]:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level={"WARN": "WARNING"}.get(args.log_level, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # per-module copy notes are noise here
    allow_identifiers(args.log_patient_identifiers or identifiers_allowed())
    inp, out, models = resolve_paths(args)
    t0 = time.perf_counter()
    try:
        package = load_package(find_package(models))
        model = ZeroShotModel(
            package, device=args.device, findings=args.findings, findings_mode=args.findings_mode, maps=args.maps
        )
    except (PackageError, FindingsFileError, DeviceError) as exc:
        log.error("%s", exc)
        return 2, []
    log_model(model)
    if not inp.exists():
        log.error("input %s does not exist", inp)
        return 1, []
    try:
        studies = discover(inp)
    except VolumeError as exc:
        log.error("%s", exc)
        return 1, []
    if not studies:
        log.error("input %s: no DICOM studies found; nothing to do", inp)
        return 1, []
    out.mkdir(parents=True, exist_ok=True)
    results: list[StudyWork] = []
    build_app(studies, model, out, results).run()
    ok = [w for w in results if not w.failed]
    failed = [w for w in results if w.failed] + [w for w in studies if w not in results]
    log.info("%d of %d studies reported (%.1f s); SRs in %s", len(ok), len(studies), time.perf_counter() - t0, out)
    for w in failed:
        log.warning("not reported: study %s: %s", w.study_uid, w.reason or "not processed")
    return (0 if ok else 1), results


def main(argv: list[str] | None = None) -> int:
    return run(argv)[0]
