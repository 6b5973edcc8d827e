"""An int8 image encoder for CPU servers: ``ct-zeroshot-train quantize``.

ONNX Runtime static quantisation of a package's image encoder: QDQ format, int8 weights per output
channel (symmetric), uint8 activations whose ranges are calibrated (min/max; the stem and the head
stay float, ``float_nodes``) on training studies of a
corpus (the development corpus's, or a site's own), each preprocessed exactly as the deploy side does.
The quantised package is checked against its float source before it is written: on the ``--check`` split
(validation by default) the share of finding decisions that change, the embeddings' cosine to the float
ones and the macro AUROC of both against the report labels (and the phantoms' truth where the corpus has
it). More than 1 % of decisions changed is refused. ``--evaluate CORPUS`` scores a held-out corpus the same
way and records it; it informs the release, it decides nothing.

The package is a new model (its own version, ``<version>+int8``, and a UID from its weights): its SRs
never pass for the float model's. Its manifest records the calibration set, the method and the measured
agreement (``provenance.quantization``); a held-out evaluation the float package carried is moved there
too, as the float's, since it was not measured on these weights. The package runs like any other
(``--device cpu`` through ONNX Runtime); on a CPU server ``--device openvino`` runs its int8 kernels
faster (docs/cpu.md has the measured figures).
"""

from __future__ import annotations

import json
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from operators import __version__
from operators.contract.package import load_package, write_package_copy
from operators.contract.scoring import ZeroShotModel

from .data import load_studies, load_volume
from .evaluate import macro_auroc
from .ground_truth import has_ground_truth, load_ground_truth, truth_matrix

MAX_DECISIONS_CHANGED = 0.01
_QDQ = (
    "onnxruntime static quantisation, QDQ: the convolutions' weights int8 per output channel (symmetric), "
    "their inputs uint8 with min/max ranges calibrated on the calibration studies; "
)
METHOD = {  # by the stem's (the first convolution's) precision
    "float": _QDQ + "the first convolution and everything after the global pooling float",
    "int8": _QDQ + "everything after the global pooling float",
}


class QuantizeError(ValueError):
    """A package that cannot be quantised, or whose int8 encoder disagrees too much with the float one."""


def _spread(items: list, n: int) -> list:
    """``n`` items evenly spread over ``items`` (all of them when there are fewer), in their order."""
    if n >= len(items):
        return list(items)
    idx = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in idx]


def calibration_reader(studies: list, make_input, input_name: str, progress: bool):
    """ONNX Runtime's calibration reader over ``studies``, each made into a model input by ``make_input``
    (a study -> (1,1,X,Y,Z) float32) when it is read: with ``CalibStridedMinMax`` 1 the ranges are merged
    after every study, so memory holds one study's volume and statistics, however many are calibrated on."""
    from onnxruntime.quantization import CalibrationDataReader
    from tqdm import tqdm

    bar = tqdm(total=len(studies), desc="calibration", unit="study", disable=not progress)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.todo: list = []

        def __len__(self):
            return len(studies)

        def set_range(self, start_index: int, end_index: int):
            self.todo = list(studies[start_index:end_index])

        def get_next(self):
            if not self.todo:
                return None
            x = make_input(self.todo.pop(0))
            bar.update()
            if bar.n == len(studies):
                bar.close()
            return {input_name: x}

    return Reader()


def float_nodes(onnx_path: Path, stem: str = "float") -> list[str]:
    """The nodes left in float: everything after the global pooling (the projection into the joint space
    on a single voxel, next to nothing to run, and the normalisation), where an int8 rounding would move
    every embedding, and with ``stem`` "float" the first convolution (on the image itself: one input
    channel whose 256 uint8 levels are ~3 HU of the window). The backbone's other convolutions carry the
    cost and are quantised. A float stem is the default: on the demo model's validation studies an int8
    stem changed 1.1 % of decisions, a float one 0.75 %; it costs speed at Merlin's size (docs/cpu.md)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = [n.name for n in graph.node]
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    pools = [i for i, n in enumerate(graph.node) if n.op_type in ("GlobalAveragePool", "ReduceMean")]
    return (convs[:1] if stem == "float" else []) + (names[pools[-1] + 1 :] if pools else [])


def quantize_encoder(float_onnx: Path, out_onnx: Path, reader, stem: str = "float") -> None:
    """``float_onnx`` -> ``out_onnx``: shape inference and graph optimisation (ONNX Runtime's
    ``quant_pre_process``), then static QDQ quantisation calibrated on ``reader``'s inputs, one study at
    a time (``calibration_reader``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(dir=out_onnx.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(float_onnx), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out_onnx),
            reader,
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            op_types_to_quantize=["Conv"],
            nodes_to_exclude=float_nodes(pre, stem),
            extra_options={"CalibStridedMinMax": 1},
        )


def compare(float_pkg: Path, int8_pkg: Path, data: Path, split: str | None, progress: bool, limit: int | None = None):
    """The float and int8 packages on the same preprocessed studies of ``data`` (its ``split``; every study
    when None): decisions changed, embedding cosine, macro AUROC of each against the report labels and,
    where the corpus has it, the phantoms' ground truth."""
    from tqdm import tqdm

    from operators.contract.preprocessing import build_transform, preprocess

    studies = [s for s in load_studies(data) if split is None or s.split == split]
    if limit:
        studies = _spread(studies, limit)
    if not studies:
        raise QuantizeError(f"{data}: no study in its {split!r} split to compare the encoders on")
    models = [ZeroShotModel(load_package(p), device="cpu") for p in (float_pkg, int8_pkg)]
    if openvino_installed():  # the int8 package's fast path computes its own roundings: checked too
        models.append(ZeroShotModel(load_package(int8_pkg), device="openvino"))
    spec = models[0].package.spec
    transform = build_transform(spec)
    embs: list[list[np.ndarray]] = [[] for _ in models]
    bar = tqdm(total=len(studies), desc=f"compare {split or data.name}", unit="study", disable=not progress)
    for i in range(0, len(studies), 8):
        chunk = studies[i : i + 8]
        x = np.stack([preprocess(load_volume(s), spec, transform) for s in chunk])
        for k, m in enumerate(models):
            embs[k].append(m.embed_images(x))
        bar.update(len(chunk))
    bar.close()
    e = [np.concatenate(x) for x in embs]
    found = [m.decide(x) for m, x in zip(models, e)]
    probs = [np.stack([f.probabilities for f in fs]) for fs in found]
    decided = [np.stack([f.present for f in fs]) for fs in found]
    assessed = np.asarray(models[0].package.assessed, dtype=bool)
    labels = np.stack([s.labels for s in studies])
    truth = None
    if has_ground_truth(data):
        truth = truth_matrix(load_ground_truth(data), [s.study_id for s in studies], models[0].package.catalogue.ids)

    def agreement(k: int) -> dict:
        cos = (e[0] * e[k]).sum(1) / np.linalg.norm(e[0], axis=1) / np.linalg.norm(e[k], axis=1)
        cells = decided[0][:, assessed]
        changed = int((cells != decided[k][:, assessed]).sum())
        rec: dict = {
            "decisions": int(cells.size),
            "decisions_changed": changed,
            "changed_fraction": changed / max(1, cells.size),
            "embedding_cosine_min": float(cos.min()),
            "embedding_cosine_median": float(np.median(cos)),
            "probability_change_max": float(np.abs(probs[0] - probs[k]).max()),
        }
        for name, t in (("report_labels", labels), ("ground_truth", truth)):
            if t is not None:
                a, b = macro_auroc(probs[0], t), macro_auroc(probs[k], t)
                rec[name] = {"macro_auroc_float": a, "macro_auroc_int8": b, "difference": b - a}
        return rec

    out: dict = {"corpus": str(data), "split": split or "all", "studies": len(studies), **agreement(1)}
    if len(models) > 2:
        out["openvino"] = agreement(2)
    return out


def openvino_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("openvino") is not None


def _describe(rec: dict, runtime: str = "onnxruntime") -> str:
    line = (
        f"{rec['studies']} {rec['split']} studies of {Path(rec['corpus']).name}, int8 on {runtime}: "
        f"{rec['decisions_changed']}/{rec['decisions']} decisions changed ({rec['changed_fraction']:.2%}), "
        f"embedding cosine >= {rec['embedding_cosine_min']:.5f}, macro AUROC (labels) "
        f"{rec['report_labels']['macro_auroc_float']:.4f} float, {rec['report_labels']['macro_auroc_int8']:.4f} int8"
    )
    if "ground_truth" in rec:
        g = rec["ground_truth"]
        line += f"; (truth) {g['macro_auroc_float']:.4f} float, {g['macro_auroc_int8']:.4f} int8"
    if "openvino" in rec:
        line += "\n" + _describe(_ov(rec), "openvino")
    return line


def _ov(rec: dict) -> dict:
    """``rec`` with the OpenVINO path's agreement in place of ONNX Runtime's (for ``_describe``)."""
    return {k: v for k, v in rec.items() if k != "openvino"} | rec["openvino"]


def quantize_package(
    package: str | Path,
    data: str | Path,
    out: str | Path,
    studies: int = 128,
    split: str = "train",
    check: str = "validation",
    check_studies: int | None = None,
    evaluate: str | Path | None = None,
    progress: bool = True,
    log=print,
    max_changed: float = MAX_DECISIONS_CHANGED,
    stem: str = "float",
) -> dict:
    """Quantise ``package``'s image encoder, calibrated on ``studies`` studies of ``data``'s ``split``;
    compare with the float package on ``check`` (refused above ``max_changed`` of its decisions) and, with
    ``evaluate``, on that corpus; write the int8 package to ``out``. Returns the manifest's record."""
    package, data, out = Path(package), Path(data), Path(out)
    if out.exists():
        raise QuantizeError(f"{out}: already exists; name a new folder for the int8 package")
    pkg = load_package(package)
    manifest = json.loads((package / "manifest.json").read_text())
    if manifest.get("provenance", {}).get("quantization"):
        raise QuantizeError(f"{package}: its image encoder is already quantised (provenance.quantization)")
    pool = sorted((s for s in load_studies(data) if s.split == split), key=lambda s: s.study_id)
    if not pool:
        raise QuantizeError(f"{data}: no study in its {split!r} split to calibrate on")
    chosen = _spread(pool, studies)
    t0 = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        staged = Path(tmp) / pkg.image_encoder.file
        from operators.contract.preprocessing import build_transform, preprocess

        transform = build_transform(pkg.spec)

        def make_input(study) -> np.ndarray:
            return preprocess(load_volume(study), pkg.spec, transform)[None].astype(np.float32)

        reader = calibration_reader(chosen, make_input, pkg.image_encoder.input, progress)
        log(f"quantising {pkg.image_encoder_path} on {len(chosen)} {split} studies of {data}")
        quantize_encoder(pkg.image_encoder_path, staged, reader, stem)
        seconds = round(time.time() - t0, 1)
        record: dict = {
            "method": METHOD[stem],
            "stem": stem,
            "by": f"ct-zeroshot {__version__}",
            "quantised": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": seconds,
            "float_package": {"name": pkg.name, "version": pkg.version, "uid": pkg.manifest.model.uid},
            "calibration": {
                "corpus": str(data),
                "split": split,
                "studies": len(chosen),
                "study_ids": [s.study_id for s in chosen],
            },
            "bytes_float": pkg.image_encoder_path.stat().st_size,
            "bytes_int8": staged.stat().st_size,
        }
        model = manifest["model"]
        float_eval = model.pop("evaluation", None)
        if float_eval:
            record["float_evaluation"] = float_eval
        model["version"] = f"{pkg.version}+int8"
        manifest.setdefault("provenance", {})["quantization"] = record

        def with_uid(staging: Path, doc: dict) -> dict:
            from .export import _model_uid

            doc["model"]["uid"] = _model_uid(staging, pkg.manifest.text_encoder)
            return doc

        staging_pkg = Path(tmp) / "package"
        write_package_copy(package, staging_pkg, manifest, replace={pkg.image_encoder.file: staged}, finish=with_uid)
        check_rec = compare(package, staging_pkg, data, check, progress, check_studies)
        log(_describe(check_rec))
        worst = max(check_rec["changed_fraction"], check_rec.get("openvino", {}).get("changed_fraction", 0.0))
        if worst > max_changed:
            raise QuantizeError(
                f"the int8 image encoder changes {worst:.2%} of {check} decisions "
                f"(> {max_changed:.0%}); calibrate on more or other studies (--studies), or ship the "
                "float package"
            )
        record["check"] = check_rec
        if evaluate is not None:
            record["evaluation"] = compare(package, staging_pkg, Path(evaluate), None, progress)
            log(_describe(record["evaluation"]))
        final = json.loads((staging_pkg / "manifest.json").read_text())
        final["provenance"]["quantization"] = record
        write_package_copy(staging_pkg, out, final)
    log(
        f"int8 package ({record['bytes_int8'] / 1e6:.1f} MB, float {record['bytes_float'] / 1e6:.1f} MB, "
        f"{final['model']['name']} {final['model']['version']}): {out}"
    )
    return record
