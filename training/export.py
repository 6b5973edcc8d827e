"""Export a dual encoder to a model package (see ``operators/contract/package.py`` for the contract).

What is written, in this order (the manifest last, so an interrupted export is refused on load):

1. ``image_encoder.onnx``: ``image`` (B,1,X,Y,Z) float32 in [0,1] -> ``embedding`` (B,D), L2-normalised;
   batch and spatial axes dynamic (global average pooling makes the trunk size-agnostic).
2. ``text_encoder.onnx`` + ``tokenizer.json``: ``input_ids``, ``attention_mask`` -> ``embedding``; dynamic
   batch and sequence. Text towers that do not export faithfully (Merlin's Longformer, whose sliding
   window is traced into fixed-size chunking) are traced at exactly one attention window, and the shipped
   tokenizer pads every text to that length (longer custom texts are truncated to it); when parity fails
   the package ships prompt embeddings only and says why in the manifest.
3. ``prompt_embeddings.npy``: every finding's prompts embedded by the torch model (the reference).
4. ``manifest.json``.

**Parity** is measured at export and recorded: ONNX Runtime vs torch on held-out inputs (max abs
difference of embeddings <= 1e-4 at two spatial sizes, identical zero-shot decisions), and the
deploy-side tokenizer (``tokenizers`` + Merlin's normalisation) vs the training tokenizer (identical
ids). Any failure of the image encoder's parity raises ``ExportError`` and leaves no manifest.

**Thresholds**: ``merlin`` (default) puts 0.5 on the two-way softmax probability for every finding,
Merlin's "positive mean higher"; ``validation`` chooses them on the validation split
(``thresholds.choose_thresholds``): a finding below the AUROC floor, or with a single class there, is
marked not assessed and never reported present; the others get the F1-optimal threshold among those
calling at most 1.5 studies per positive. With ``validation``, each finding's certainty is calibrated on
the same studies too (``calibration.fit_platt``), so an SR states a probability of presence.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from operators import __version__
from operators.contract.findings import load_catalogue
from operators.contract.manifest import (
    FindingEntry,
    ImageEncoderRecord,
    Manifest,
    ModelIdentity,
    PromptTable,
    TextEncoderRecord,
    weights_digest,
)
from operators.contract.package import sha256_file, write_manifest
from operators.contract.preprocessing import PreprocessSpec
from operators.contract.prompts import prompt_table
from operators.contract.scoring import decide_present, margin_probability

from .calibration import fit_platt
from .models.clip import DualEncoder
from .onnx_export import (
    OPSET,
    ExportError,
    attention_window,
    deploy_tokenize,
    export_image_encoder,
    export_text_encoder,
    image_parity,
    text_parity,
    write_tokenizer,
)
from .thresholds import AUROC_FLOOR, MAX_CALL_RATIO, choose_thresholds

DESCRIPTION_RULE = (
    "Merlin: per finding, mean cosine similarity to positive prompts (s+) and to negative prompts "
    "(s-); probability = softmax(logit_scale * [s+, s-])[0] = sigmoid(logit_scale * (s+ - s-)); "
    "present iff probability >= threshold"
)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _model_uid(out: Path, text_rec: TextEncoderRecord) -> str:
    """The model UID, derived from the weights (the files that decide): the same weights get the same
    UID, other weights another (pydicom's deterministic UID from entropy sources)."""
    from pydicom.uid import generate_uid

    decisive = ["image_encoder.onnx", "prompt_embeddings.npy", *text_rec.files]
    return str(generate_uid(entropy_srcs=[weights_digest({f: sha256_file(out / f) for f in decisive})]))


def embed_prompts(model: DualEncoder, prompts: list[str], batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """(P, D) float32 embeddings of prompts by the torch text tower (the package's reference table)."""
    from tqdm import tqdm

    chunks = []
    batches = range(0, len(prompts), batch_size)
    with torch.no_grad():
        for i in tqdm(batches, desc="prompt embeddings", unit="batch", leave=False, disable=not progress):
            chunks.append(model.encode_texts(prompts[i : i + batch_size]).float().numpy())
    return np.concatenate(chunks).astype(np.float32)


def export_package(
    model: DualEncoder,
    out: str | Path,
    *,
    spec: PreprocessSpec,
    parity_volumes: np.ndarray,
    name: str,
    version: str,
    provenance: dict,
    thresholds: np.ndarray | None = None,
    threshold_method: str = "merlin",
    threshold_notes: list[dict] | None = None,
    text: str = "auto",
    log: Callable[[str], None] = print,
    text_absent_reason: str | None = None,
    intended_use: str | None = None,
    calibration: list[dict] | None = None,
) -> Manifest:
    """Write a model package for ``model`` into ``out`` (new or empty). Returns the manifest.

    ``text``: ``onnx`` (fail if the text tower does not export with parity), ``auto`` (fall back to
    prompt embeddings only), ``none`` (prompt embeddings only).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: output folder exists and is not empty")
    if text not in ("onnx", "auto", "none"):
        raise ValueError(f"text must be onnx, auto or none, got {text!r}")
    out.mkdir(parents=True, exist_ok=True)
    model = model.cpu().eval()
    catalogue = load_catalogue()
    prompts, rows = prompt_table(catalogue)

    log(f"prompt embeddings: {len(prompts)} prompts of {len(catalogue)} findings")
    prompt_emb = embed_prompts(model, prompts, progress=True)
    np.save(out / "prompt_embeddings.npy", prompt_emb)
    dim = int(prompt_emb.shape[1])

    log("image encoder -> ONNX")
    parity_volumes = np.ascontiguousarray(parity_volumes, dtype=np.float32)
    maps = export_image_encoder(model, out / "image_encoder.onnx", torch.from_numpy(parity_volumes[:1]))
    img_par = image_parity(model, out / "image_encoder.onnx", parity_volumes, prompt_emb, rows, maps)
    log(
        f"image parity: max |diff| {img_par['max_abs_diff']:.2e} over {img_par['inputs']} inputs at "
        f"{img_par['spatial_sizes']}, decisions identical: {img_par['decisions_identical']}"
    )
    if not img_par["passed"]:
        raise ExportError(f"image encoder parity failed: {img_par}; no package written")

    text_rec = TextEncoderRecord(None)
    text_par = None
    if text != "none":
        window = attention_window(model)
        fixed = window if window > 1 else None  # Longformer: trace at exactly one window, pad to it
        tok_info = write_tokenizer(model, out / "tokenizer.json", fixed)
        tok = deploy_tokenize(out / "tokenizer.json", prompts[:8])
        log("text encoder -> ONNX" + (f" (fixed sequence length {fixed}: one attention window)" if fixed else ""))
        failure = None
        try:
            export_text_encoder(
                model,
                out / "text_encoder.onnx",
                {k: torch.from_numpy(v) for k, v in tok.items()},
                dynamic_sequence=fixed is None,
            )
            text_par = text_parity(model, out / "text_encoder.onnx", out / "tokenizer.json", prompts)
            log(
                f"text parity: max |diff| {text_par['max_abs_diff']:.2e} over {len(prompts)} prompts, "
                f"tokens identical: {text_par['tokens_identical']}"
            )
            if not text_par["passed"]:
                failure = f"ONNX text encoder parity failed ({text_par})"
        except Exception as exc:  # noqa: BLE001 - any exporter failure means: no ONNX text tower
            failure = f"ONNX export of the text tower failed: {type(exc).__name__}: {exc}"
        if failure is None:
            text_rec = TextEncoderRecord(
                "text_encoder.onnx",
                tokenizer="tokenizer.json",
                # the text rule the tower was trained with, applied by the deploy side before tokenising
                keep_sentences=model.encode_text.keep_sentences,
                **tok_info,
            )
        elif text == "onnx":
            raise ExportError(failure)
        else:
            log(f"text encoder not shipped: {failure}")
            for f in ("text_encoder.onnx", "tokenizer.json"):
                (out / f).unlink(missing_ok=True)
            text_rec = TextEncoderRecord(
                None,
                failure[:2000] + "; the package carries precomputed prompt embeddings only; custom prompts "
                "need the torch model (training side)",
            )
    else:
        text_rec = TextEncoderRecord(
            None,
            text_absent_reason
            or "not exported (text='none'); prompt embeddings only; custom prompts need the torch model",
        )

    if thresholds is None:
        thresholds = np.full(len(catalogue), 0.5)
    findings = tuple(
        FindingEntry(
            f,
            r,
            float(thresholds[i]),
            bool(threshold_notes[i].get("assessed", True)) if threshold_notes else True,
            threshold_notes[i] if threshold_notes else None,
            calibration[i] if calibration else None,
        )
        for i, (f, r) in enumerate(zip(catalogue, rows))
    )
    log_scale = float(model.logit_scale.detach().clamp(max=math.log(100.0)))
    manifest = Manifest(
        model=ModelIdentity(
            name,
            version,
            _model_uid(out, text_rec),
            _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            intended_use,
        ),
        provenance={
            "exporter": f"ct-zeroshot {__version__}",
            "code_commit": _git_commit(),
            "torch": torch.__version__,
            **provenance,
        },
        preprocessing=spec,
        image_encoder=ImageEncoderRecord("image_encoder.onnx", opset=OPSET, localisation=maps),
        text_encoder=text_rec,
        embedding_dim=dim,
        log_logit_scale=log_scale,
        prompt_embeddings=PromptTable("prompt_embeddings.npy", (prompt_emb.shape[0], dim)),
        decision_rule=DESCRIPTION_RULE,
        threshold_method=threshold_method,
        private_scheme=catalogue.private_scheme,
        findings=findings,
        parity={"image": img_par, "text": text_par},
    )
    manifest = write_manifest(out, manifest)
    total = sum(v["bytes"] for v in manifest.files.values())
    log(f"package written: {out} ({total / 1e6:.1f} MB)")
    return manifest


def export_run(
    run: str | Path,
    out: str | Path,
    data: str | Path,
    checkpoint: str = "best",
    thresholds: str = "merlin",
    name: str | None = None,
    version: str = "0.1.0",
    parity_studies: int = 8,
    cache_dir=None,
    progress: bool = True,
    text: str = "auto",
    log: Callable[[str], None] = print,
    auroc_floor: float = AUROC_FLOOR,
    intended_use: str | None = None,
    device: str = "auto",
) -> Manifest:
    """Export a training run's checkpoint. ``data`` is the run's data set: its test split gives the
    held-out parity inputs, its validation split the per-finding thresholds (``thresholds=validation``).
    ``intended_use``: stated in the package and every SR; by default, for a run on the synthetic corpus,
    that it knows phantoms only."""
    from .cache import split_volumes
    from .evaluate import embed_images, prompt_embeddings, zero_shot_scores
    from .run_folder import load_run

    run = Path(run)
    if thresholds not in ("merlin", "validation"):
        raise ValueError(f"thresholds must be merlin or validation, got {thresholds!r}")
    from .devices import torch_device

    on = torch_device(device)  # validation embeddings (thresholds) there; the ONNX graphs are traced on the CPU
    model, cfg = load_run(run, checkpoint, on)
    try:
        _, test_vols = split_volumes(cfg, data, "test", limit=parity_studies, cache_dir=cache_dir, progress=progress)
        if thresholds == "validation":
            studies, vols = split_volumes(cfg, data, "validation", cache_dir=cache_dir, progress=progress)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    parity_volumes = np.stack([test_vols[i] for i in range(len(test_vols))]).astype(np.float32)

    thr, notes, method = None, None, "merlin: probability 0.5 (positive mean similarity higher)"
    calibration = None
    assessed = np.ones(0, dtype=bool)
    if thresholds == "validation":
        labels = np.stack([s.labels for s in studies])
        img = embed_images(model, vols, on, cfg.train.batch_size)
        prompt_emb, rows = prompt_embeddings(model, on)
        _, probs = zero_shot_scores(img, prompt_emb, rows, model.scale().item())
        thr, notes, assessed = choose_thresholds(probs, labels, auroc_floor=auroc_floor)
        calibration = fit_platt(probs, labels, f"validation split of {Path(data).name} ({len(studies)} studies)")
        method = (
            f"validation: per-finding probability threshold maximising F1 on {len(studies)} validation studies, "
            f"calling at most {MAX_CALL_RATIO} x the positives; findings with validation AUROC < {auroc_floor} "
            "not assessed"
        )

    metrics = {}
    for fname in ("metrics.json", "metrics_init.json"):
        if (run / fname).exists():
            m = json.loads((run / fname).read_text())
            metrics["test" if fname == "metrics.json" else "test_before_training"] = {
                "macro_f1": m["zero_shot"]["macro_f1"],
                "macro_auroc": m["zero_shot"]["macro_auroc"],
                "retrieval": {k: v for k, v in m["retrieval"].items()},
                "split": m.get("meta", {}).get("split"),
            }
    preds = run / "metrics_predictions.npz"
    if thr is not None and preds.exists() and "test" in metrics:
        from .evaluate import macro_f1_from

        d = np.load(preds)
        prob = margin_probability(d["margins"], model.scale().item())
        decided = decide_present(prob, thr[None, :], assessed[None, :])
        metrics["test_with_package_thresholds"] = {
            "macro_f1": macro_f1_from(decided.astype(int), d["labels"]),
            "macro_f1_assessed_findings": macro_f1_from(decided[:, assessed].astype(int), d["labels"][:, assessed])
            if assessed.any()
            else None,
            "findings_not_assessed": int((~assessed).sum()),
            "calls_per_true_positive": float(decided.sum() / max(1, int((d["labels"] == 1).sum()))),
            "note": "the same test predictions as 'test', decided with the package's per-finding thresholds",
        }
    summary = json.loads((run / "train_summary.json").read_text()) if (run / "train_summary.json").exists() else {}
    provenance = {
        "source": "training run",
        "run": str(run),
        "checkpoint": checkpoint,
        "config_digest": cfg.digest(),
        "config": cfg.to_dict(),
        "data": str(data),
        "train_steps": summary.get("steps_done"),
        "best": summary.get("best"),
        "metrics": metrics,
    }
    return export_package(
        model,
        out,
        spec=cfg.spec,
        parity_volumes=parity_volumes,
        name=name or f"ct-zeroshot-{cfg.image.arch}",
        version=version,
        provenance=provenance,
        thresholds=thr,
        threshold_method=method,
        threshold_notes=notes,
        text=text,
        log=log,
        intended_use=intended_use or synthetic_corpus_use(data),
        calibration=calibration,
    )


def synthetic_corpus_use(data: str | Path) -> str | None:
    """The intended use of a model trained on ct-zeroshot's synthetic corpus (``corpus.json`` says so)."""
    try:
        corpus = json.loads((Path(data) / "corpus.json").read_text())
    except (OSError, ValueError):
        return None
    if not str(corpus.get("generator", "")).startswith("ct-zeroshot"):
        return None
    return (
        f"Research and software testing only; not for diagnostic use. Trained on the ct-zeroshot synthetic "
        f"phantom corpus (version {corpus.get('corpus_version', 1)}): it knows procedural phantoms, not patients."
    )
