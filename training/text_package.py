"""``ct-zeroshot-train add-text-encoder``: give a prompts-only package the text encoder of the run it came
from, so that a site's own findings (``--findings``) can be encoded where it is deployed.

A package exported with ``--text none`` carries its catalogue's prompt embeddings only. This command
exports the run's text tower to ONNX (the export's own code and parity checks), checks that it is the
tower that made the package's prompt embeddings (each re-encoded catalogue prompt within cosine 1e-4 of
the stored one), and with ``--quantize int8`` quantises its weights (ONNX Runtime dynamic quantisation:
int8 weights, activations quantised per batch at run time) to a quarter of the size. What quantisation
costs is measured and recorded (``provenance.text_encoder`` in the manifest): the cosine between the
int8 and float embeddings of every catalogue prompt, and, over ``--studies`` studies of the run's
validation split scored by the package's own image encoder, how many findings' decisions change when
the catalogue is scored with prompts re-encoded by the shipped encoder instead of the stored embeddings.
The stored embeddings stay what the package decides with; the encoder serves a site's findings.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from operators.contract.manifest import Manifest
from operators.contract.package import load_package, write_manifest

COSINE_SAME_TOWER = 1e-4  # float export vs stored prompt embeddings: the same tower
MAX_DECISIONS_CHANGED = 0.01  # int8: at most 1 % of validation decisions may change, or it is not shipped


class TextPackageError(ValueError):
    """The text encoder cannot be added."""


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def add_text_encoder(
    package: str | Path,
    run: str | Path,
    out: str | Path,
    quantize: str | None = "int8",
    data: str | Path | None = None,
    studies: int = 200,
    checkpoint: str = "best",
    log=print,
) -> dict:
    import torch

    from operators.contract.scoring import ZeroShotModel

    from .onnx_export import deploy_tokenize, export_text_encoder, text_parity, write_tokenizer
    from .run_folder import load_run

    package, run, out = Path(package), Path(run), Path(out)
    if out.exists():
        raise TextPackageError(f"{out}: already exists; name a new folder for the package with its text encoder")
    pkg = load_package(package)
    if pkg.manifest.text_encoder.file is not None:
        raise TextPackageError(f"{package}: already has a text encoder ({pkg.manifest.text_encoder.file})")
    model, cfg = load_run(run, checkpoint)
    recorded = pkg.manifest.provenance.get("config_digest")
    if cfg.digest() != recorded:
        raise TextPackageError(
            f"{run}: its config digest {cfg.digest()} is not the package's ({recorded}); "
            "name the run the package was exported from"
        )
    prompts = [p for e in pkg.manifest.findings for p in (*e.finding.positive_prompts, *e.finding.negative_prompts)]
    manifest = json.loads((package / "manifest.json").read_text())
    part = out.with_name(out.name + ".partial")
    shutil.rmtree(part, ignore_errors=True)
    shutil.copytree(package, part)
    tok_info = write_tokenizer(model, part / "tokenizer.json")
    example = deploy_tokenize(part / "tokenizer.json", prompts[:8])
    log("text encoder -> ONNX")
    export_text_encoder(model, part / "text_encoder.onnx", {k: torch.from_numpy(v) for k, v in example.items()})
    parity = text_parity(model, part / "text_encoder.onnx", part / "tokenizer.json", prompts)
    if not parity["passed"]:
        raise TextPackageError(f"ONNX text encoder parity failed ({parity}); nothing written")
    manifest["text_encoder"] = {
        "file": "text_encoder.onnx",
        "inputs": ["input_ids", "attention_mask"],
        "output": "embedding",
        "tokenizer": "tokenizer.json",
        "keep_sentences": model.encode_text.keep_sentences,
        **tok_info,
    }

    def deployed() -> np.ndarray:
        """The catalogue's prompts as the deploy side encodes them with the package as written now."""
        write_manifest(part, Manifest.from_dict(manifest, origin=str(package / "manifest.json")))
        return ZeroShotModel(load_package(part), device="cpu").embed_texts(prompts)

    floats = deployed()
    same = float(1 - _cosines(floats, pkg.prompt_embeddings).min())
    if same > COSINE_SAME_TOWER:
        shutil.rmtree(part, ignore_errors=True)
        raise TextPackageError(
            f"{run}: its text tower does not make the package's prompt embeddings (cosine distance up to "
            f"{same:.2e} > {COSINE_SAME_TOWER}); name the run and checkpoint the package came from"
        )
    record: dict = {
        "from_run": str(run),
        "checkpoint": checkpoint,
        "float_parity": {k: parity[k] for k in ("max_abs_diff", "tokens_identical")},
        "float_vs_stored_cosine_distance_max": same,
    }
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        float_bytes = (part / "text_encoder.onnx").stat().st_size
        float_file = part / "text_encoder.float.onnx"
        (part / "text_encoder.onnx").rename(float_file)
        quantize_dynamic(str(float_file), str(part / "text_encoder.onnx"), weight_type=QuantType.QInt8)
        float_file.unlink()
        ints = deployed()
        cos = _cosines(ints, floats)
        record["quantization"] = {
            "method": "onnxruntime dynamic quantisation: int8 weights (QInt8), activations quantised at run time",
            "bytes_float": float_bytes,
            "bytes_int8": (part / "text_encoder.onnx").stat().st_size,
            "prompt_cosine_to_float_min": float(cos.min()),
            "prompt_cosine_to_float_mean": float(cos.mean()),
        }
        if data is not None:
            decisions = _decisions_changed(pkg, data, ints, studies, log)
            record["quantization"]["decisions"] = decisions
            if decisions["changed_fraction"] > MAX_DECISIONS_CHANGED:
                shutil.rmtree(part, ignore_errors=True)
                raise TextPackageError(
                    f"the int8 text encoder changes {decisions['changed_fraction']:.2%} of validation decisions "
                    f"(> {MAX_DECISIONS_CHANGED:.0%}); ship it unquantised (--quantize none)"
                )
    record["bytes"] = (part / "text_encoder.onnx").stat().st_size
    manifest.setdefault("provenance", {})["text_encoder"] = record
    write_manifest(part, Manifest.from_dict(manifest, origin=str(package / "manifest.json")))
    load_package(part)
    part.rename(out)
    log(json.dumps(record, indent=1))
    log(f"package with its text encoder ({record['bytes'] / 1e6:.1f} MB): {out}")
    return record


def _decisions_changed(pkg, data, prompt_emb: np.ndarray, studies: int, log) -> dict:
    """Over ``studies`` validation studies scored by the package's image encoder: the share of finding
    decisions that differ between the stored prompt embeddings and ``prompt_emb``, and the largest change
    of a probability."""
    from operators.contract.preprocessing import build_transform, preprocess
    from operators.contract.scoring import ZeroShotModel, decide_present, finding_scores

    from .data import load_studies, load_volume

    chosen = [s for s in load_studies(data) if s.split == "validation"][:studies]
    if not chosen:
        raise TextPackageError(f"{data}: no validation study to measure the int8 text encoder on")
    model = ZeroShotModel(pkg, device="cpu")
    transform = build_transform(pkg.spec)
    embs = []
    for i in range(0, len(chosen), 8):
        x = np.stack([preprocess(load_volume(s), pkg.spec, transform) for s in chosen[i : i + 8]])
        embs.append(model.embed_images(x))
    img = np.concatenate(embs)
    _, p_stored = finding_scores(img, pkg.prompt_embeddings, pkg.rows, pkg.logit_scale)
    _, p_int8 = finding_scores(img, prompt_emb.astype(np.float32), pkg.rows, pkg.logit_scale)
    a = decide_present(p_stored, pkg.thresholds, pkg.assessed)
    b = decide_present(p_int8, pkg.thresholds, pkg.assessed)
    out = {
        "studies": len(chosen),
        "decisions": int(a.size),
        "changed": int((a != b).sum()),
        "changed_fraction": float((a != b).mean()),
        "max_abs_probability_change": float(np.abs(p_stored - p_int8).max()),
    }
    log(f"int8 prompts vs stored: {out['changed']} of {out['decisions']} decisions differ on {len(chosen)} studies")
    return out
