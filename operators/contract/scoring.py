"""Zero-shot finding detection with a model package: ONNX Runtime encoders and Merlin's decision rule.

Merlin's rule, per finding: the mean cosine similarity of the image embedding to the finding's
positive prompts (``s+``) and to its negative prompts (``s-``); the probability is the two-way softmax of
``scale * [s+, s-]``, i.e. ``sigmoid(scale * (s+ - s-))``, 0.5 exactly where the two means are equal.
A finding is reported present when its probability reaches the package's threshold for it (0.5 by
default, which is Merlin's "positive mean higher"). The training side evaluates with the same function,
so the numbers a run reports are the numbers the deployed package produces.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .package import ModelPackage
from .prompts import FindingRows
from .textnorm import keep_sentences, normalize_text

log = logging.getLogger(__name__)


def finding_scores(
    image_emb: np.ndarray, prompt_emb: np.ndarray, rows: Sequence[FindingRows], scale: float
) -> tuple[np.ndarray, np.ndarray]:
    """(margins, probabilities), each (N, n_findings), from L2-normalised embeddings."""
    sim = np.asarray(image_emb, dtype=np.float64) @ np.asarray(prompt_emb, dtype=np.float64).T
    margins = np.stack(
        [sim[:, r.positive[0] : r.positive[1]].mean(1) - sim[:, r.negative[0] : r.negative[1]].mean(1) for r in rows],
        axis=1,
    )
    return margins, margin_probability(margins, scale)


def margin_probability(margins: np.ndarray, scale: float) -> np.ndarray:
    """Two-way softmax of ``scale * [s+, s-]`` = ``sigmoid(scale * (s+ - s-))``."""
    return 1.0 / (1.0 + np.exp(-np.clip(scale * np.asarray(margins, dtype=np.float64), -60.0, 60.0)))


def tokenize(tokenizer, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Merlin's normalisation, then a ``tokenizers`` tokenizer (its file sets truncation and padding,
    including a fixed sequence length for graphs traced at one length)."""
    enc = tokenizer.encode_batch([normalize_text(t) for t in texts])
    return {
        "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
    }


class DeviceError(RuntimeError):
    """A named device that cannot be used (``--device cuda`` without a CUDA provider that loads)."""


# auto: CUDA when its provider loads, else the CPU; cpu and cuda: ONNX Runtime's providers; openvino: the
# image encoder on OpenVINO's CPU runtime (an int8 package's fast path on a CPU server, docs/cpu.md).
DEVICES = ("auto", "cpu", "cuda", "openvino")


def select_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers to ask for: CUDA first when requested or available, CPU always last.
    ``cuda`` without ONNX Runtime's CUDA provider is a ``DeviceError``; ``auto`` then takes the CPU."""
    import onnxruntime as ort

    if device not in DEVICES:
        raise ValueError(f"device must be {', '.join(DEVICES[:-1])} or {DEVICES[-1]}, got {device!r}")
    available = ort.get_available_providers()
    if device in ("cpu", "openvino"):  # openvino: the image encoder's runtime; the text encoder runs here
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise DeviceError(
            f"device cuda: this ONNX Runtime has no CUDA provider (it has {', '.join(available)}); "
            "install onnxruntime-gpu with its CUDA libraries, or use --device auto or cpu"
        )
    return ["CPUExecutionProvider"]


def open_session(path: Path, providers: list[str], threads: int | None = None):
    """An ORT session; the providers it *actually* uses are on ``session.get_providers()``
    (the CUDA provider silently drops out when its libraries do not load)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # No busy-waiting of idle ORT threads between runs: decoding and preprocessing of the next study
    # share the cores (measured: they ran 2-3x slower beside a spinning pool).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


class OpenVinoSession:
    """The image encoder on OpenVINO's CPU runtime, answering the part of ONNX Runtime's session interface
    that ``ZeroShotModel`` uses (inputs, outputs, providers, ``run``). OpenVINO reads the ONNX file itself
    and runs a QDQ int8 encoder with int8 kernels, where ONNX Runtime's CPU provider gains less (docs/cpu.md).
    One infer request per call, so concurrent pipeline threads never share one."""

    PROVIDER = "OpenVINO-CPU"

    def __init__(self, path: Path, threads: int | None = None, hint: str = "LATENCY"):
        try:
            import openvino as ov
        except ImportError:
            raise DeviceError(
                "device openvino: the openvino package is not installed (pip install openvino); "
                "use --device cpu for ONNX Runtime's CPU provider"
            ) from None
        config: dict[str, Any] = {"PERFORMANCE_HINT": hint}
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        except RuntimeError as exc:
            raise DeviceError(f"device openvino: OpenVINO cannot compile {path} ({str(exc).splitlines()[0]})") from None
        self._inputs = [SimpleNamespace(name=p.get_any_name()) for p in self.compiled.inputs]
        self._outputs = [SimpleNamespace(name=p.get_any_name()) for p in self.compiled.outputs]

    def get_inputs(self) -> list:
        return self._inputs

    def get_outputs(self) -> list:
        return self._outputs

    def get_providers(self) -> list[str]:
        return [self.PROVIDER]

    def run(self, names: Sequence[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result = self.compiled.create_infer_request().infer(feeds)
        return [np.array(result[self.compiled.output(n)]) for n in names]


@dataclass
class Findings:
    """Per-study output: one row of probabilities and decisions in catalogue order."""

    ids: list[str]
    probabilities: np.ndarray  # (n_findings,)
    margins: np.ndarray
    present: np.ndarray  # bool (n_findings,); never true where not assessed
    thresholds: np.ndarray
    assessed: np.ndarray  # bool (n_findings,): false = the package cannot assess this finding
    # (n_findings,) calibrated probability of presence (the SR's certainty); NaN where uncalibrated
    certainties: np.ndarray | None = None

    def certainty(self, j: int) -> tuple[float, bool]:
        """Finding ``j``'s certainty as the SR states it (0-1) and whether it is calibrated; without a
        calibration, the raw score."""
        c = None if self.certainties is None else float(self.certainties[j])
        if c is None or c != c:  # NaN: uncalibrated
            return float(self.probabilities[j]), False
        return c, True


MERLIN_THRESHOLD = 0.5  # probability 0.5 <=> the positive prompts' mean similarity is the higher


def decide_present(probabilities: np.ndarray, thresholds=MERLIN_THRESHOLD, assessed=True) -> np.ndarray:
    """The one present/absent rule: the probability reaches the finding's threshold (Merlin's 0.5 by
    default), and the package can assess the finding."""
    return (np.asarray(probabilities) >= thresholds) & assessed


def merlin_present(margins: np.ndarray) -> np.ndarray:
    """Merlin's rule from margins (s+ - s-): ``decide_present`` at 0.5, which holds whatever the scale."""
    return decide_present(margin_probability(margins, 1.0))


class PromptEncoder:
    """A package's ONNX text encoder and tokenizer, opened on first use: custom prompts to embeddings."""

    def __init__(self, package: ModelPackage, providers: Sequence[str] = ("CPUExecutionProvider",), threads=None):
        self.package, self.providers, self.threads = package, list(providers), threads
        self._session = None
        self._tokenizer = None
        self._counter: Any = None  # tokenizers.Tokenizer, untruncated and unpadded (count_tokens)

    def _text(self):
        te = self.package.text_encoder
        if te is None:
            reason = self.package.manifest.text_encoder.absent_reason
            raise RuntimeError(
                f"model package {self.package.root} has no text encoder ({reason}); "
                "custom prompts need the training side's torch model"
            )
        if self._session is None:
            from tokenizers import Tokenizer

            self._tokenizer = Tokenizer.from_file(str(self.package.root / str(te.tokenizer)))
            self._session = open_session(self.package.root / str(te.file), self.providers, self.threads)
        return te

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        self._text()
        return tokenize(self._tokenizer, texts)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """Embeddings of raw texts through the package's text encoder, after the text rule the tower was
        trained with (``text_encoder.keep_sentences``: a denying prompt encodes as "Normal.")."""
        te = self._text()
        texts = [keep_sentences(t, te.keep_sentences) for t in texts]
        out: list[np.ndarray] = []
        for i in range(0, len(texts), batch_size):
            feed = self.tokenize(texts[i : i + batch_size])
            assert self._session is not None  # opened by _text()
            out.append(self._session.run([te.output], {k: feed[k] for k in te.inputs})[0])
        return np.concatenate(out) if out else np.zeros((0, self.package.embedding_dim), np.float32)

    def count_tokens(self, text: str) -> int:
        """Tokens of a text after the text rule, untruncated and unpadded (what a prompt needs)."""
        te = self._text()
        if self._counter is None:  # the package's tokenizer without its truncation and padding, loaded once
            from tokenizers import Tokenizer

            self._counter = Tokenizer.from_file(str(self.package.root / str(te.tokenizer)))
            self._counter.no_truncation()
            self._counter.no_padding()
        return len(self._counter.encode(normalize_text(keep_sentences(text, te.keep_sentences))).ids)


def package_with_findings(
    package: ModelPackage, path: str | Path, mode: str = "add", encoder: PromptEncoder | None = None
) -> ModelPackage:
    """``package`` scoring a site's findings file (``operators.contract.custom_findings``) beside (``add``) or
    instead of (``replace``) its own findings; the prompts are encoded here, once, by the package's text
    encoder. Refused with the file, line and problem (``FindingsFileError``)."""
    from .custom_findings import FindingsFileError, check_against, check_lengths, read_findings_file, with_findings

    ff = read_findings_file(path, package.manifest.private_scheme.scheme)
    check_against(ff, package.catalogue.ids, mode)  # before the text encoder: a clash is named first
    te = package.text_encoder
    if te is None:
        reason = package.manifest.text_encoder.absent_reason
        raise FindingsFileError(
            f"{path}: model package {package.root} cannot encode prompts ({reason}); write a package that holds them: "
            "ct-zeroshot-train encode-prompts --package PKG --findings FILE --out PKG2 --run RUN (or --checkpoint "
            "MERLIN.pt --text-model DIR)"
        )
    encoder = encoder or PromptEncoder(package)
    limit = te.sequence_length or te.max_length
    if limit:
        check_lengths(ff, encoder.count_tokens, limit)
    view = with_findings(package, ff, mode, encoder.embed_texts)
    log.info("custom findings from %s (%s mode, digest %s): %s", Path(path).name, mode, ff.digest[:16], ff.ids)
    return view


class ZeroShotModel:
    """A loaded package ready to score preprocessed volumes (and, if it has one, encode custom prompts).
    ``findings``: a site's findings file scored beside (``findings_mode`` add) or instead of (replace)
    the package's own."""

    def __init__(
        self,
        package: ModelPackage,
        device: str = "auto",
        threads: int | None = None,
        findings: str | Path | None = None,
        findings_mode: str = "add",
        maps: bool | None = False,
    ):
        """``maps``: True makes a localisation map for each present finding (``operators.localisation``) and
        refuses a package without the output; None (auto) makes them when the package can; False never."""
        self.package = package
        requested = select_providers(device)
        if device == "openvino":
            self.image_session = OpenVinoSession(package.image_encoder_path, threads)
        else:
            self.image_session = open_session(package.image_encoder_path, requested, threads)
        self.providers = self.image_session.get_providers()
        if requested[0] == "CUDAExecutionProvider" and self.providers[0] != "CUDAExecutionProvider":
            if device == "cuda":
                raise DeviceError(
                    f"device cuda: the CUDA provider did not load for {package.image_encoder_path} (ONNX Runtime "
                    "fell back to the CPU: the CUDA or cuDNN libraries, or the driver, are missing); "
                    "use --device auto or cpu"
                )
            log.warning("device auto: the CUDA provider is installed but did not load; running on the CPU")
        self.requested_device = device
        ie = package.image_encoder
        self._image_in, self._image_out, self._map_out = ie.input, ie.output, ie.localisation
        self._check_image_encoder()
        if maps and self._map_out is None:
            from .package import PackageError

            raise PackageError(
                f"model package {package.root}: maps were asked for, but its image encoder has no localisation "
                "output (a package exported before maps, or a tower without average pooling); export it again, "
                "or run with --no-maps"
            )
        self.maps = bool(self._map_out is not None if maps is None else maps)
        self.prompts = PromptEncoder(package, requested if device == "openvino" else self.providers, threads)
        if findings is not None:
            self.package = package_with_findings(package, findings, findings_mode, self.prompts)

    def _check_image_encoder(self) -> None:
        """One pass over a zero volume of the spec's shape: the encoder takes the manifest's input name and
        shape and gives finite (1, embedding_dim) embeddings under its output name, or the package is
        refused at load (``PackageError``) rather than failing every study."""
        from .package import PackageError

        pkg, where = self.package, f"model package {self.package.root}: {self.package.image_encoder.file}"
        inputs = [i.name for i in self.image_session.get_inputs()]
        outputs = [o.name for o in self.image_session.get_outputs()]
        named = [self._image_out] + ([self._map_out] if self._map_out else [])
        if self._image_in not in inputs or set(named) - set(outputs):
            raise PackageError(
                f"{where}: takes {inputs} and gives {outputs}; the manifest names input {self._image_in!r} "
                f"and outputs {named}"
            )
        try:
            emb = self.embed_images(np.zeros((1, 1, *pkg.spec.spatial_size), dtype=np.float32))
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for a wrong shape
            raise PackageError(
                f"{where}: fails on a volume of the manifest's shape {tuple(pkg.spec.spatial_size)} "
                f"({type(exc).__name__})"
            ) from None
        if emb.shape != (1, pkg.embedding_dim):
            raise PackageError(
                f"{where}: gives embeddings of shape {emb.shape}, the manifest says (1, {pkg.embedding_dim})"
            )
        if not np.isfinite(emb).all():
            raise PackageError(f"{where}: gives non-finite embeddings for a zero volume")

    @property
    def device(self) -> str:
        if self.providers[0] == OpenVinoSession.PROVIDER:
            return "openvino"
        return "cuda" if self.providers[0] == "CUDAExecutionProvider" else "cpu"

    @property
    def has_maps(self) -> bool:
        """Whether the package's image encoder gives localisation maps (``operators.localisation``)."""
        return self._map_out is not None

    def embed_images(self, batch: np.ndarray) -> np.ndarray:
        """(B,1,X,Y,Z) float32 -> (B,D) embeddings."""
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return self.image_session.run([self._image_out], {self._image_in: x})[0]

    def embed_images_with_maps(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B,1,X,Y,Z) float32 -> (B,D) embeddings and (B,D,x,y,z) localisation features, one pass."""
        if self._map_out is None:
            raise ValueError(f"model package {self.package.root} has no localisation output (maps)")
        x = np.ascontiguousarray(batch, dtype=np.float32)
        emb, loc = self.image_session.run([self._image_out, self._map_out], {self._image_in: x})
        return emb, loc

    def decide(
        self, image_emb: np.ndarray, prompt_emb: np.ndarray | None = None, rows: Sequence[FindingRows] | None = None
    ) -> list[Findings]:
        pkg = self.package
        margins, probs = finding_scores(
            image_emb,
            pkg.prompt_embeddings if prompt_emb is None else prompt_emb,
            pkg.rows if rows is None else rows,
            pkg.logit_scale,
        )
        thr, assessed = pkg.thresholds, pkg.assessed
        cert = pkg.certainties(probs)
        return [
            Findings(
                pkg.catalogue.ids, probs[i], margins[i], decide_present(probs[i], thr, assessed), thr, assessed, cert[i]
            )
            for i in range(len(probs))
        ]

    def score(self, volume: np.ndarray) -> Findings:
        """One preprocessed (1,X,Y,Z) volume -> its findings (one image-encoder pass)."""
        return self.decide(self.embed_images(volume[None]))[0]

    # -- custom prompts ---------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.prompts.tokenize(texts)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        return self.prompts.embed_texts(texts, batch_size)
