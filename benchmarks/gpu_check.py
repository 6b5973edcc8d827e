"""The GPU check: every figure the Merlin-scale path needs from a GPU machine, in one script and one JSON.

``make gpu-check`` (``python -m benchmarks.gpu_check --out results/gpu-check.json``) measures, on the
device PyTorch sees (CUDA when there is one):

- ``training_step``: a Merlin-size training step (I3D ResNet-152 and Clinical-Longformer's configuration,
  random weights) at 8 x 224x224x160 in bf16 with gradient checkpointing: median step time, images/s and
  peak GPU memory;
- ``ort_cuda``: whether ONNX Runtime's CUDA provider loads, and the image encoder's parity against the CPU
  provider with TF32 on and off (max |difference| of the normalised embeddings);
- ``dicom_to_sr``: the latency of one 512x512x300 DICOM study through the deploy pipeline to its SR,
  with a Merlin-size image encoder, per stage.

``--small`` runs the same code at test sizes (``i3_resnet152_mini``, 2 x 32x32x16, a small Longformer, a
512x512x40 study with the demo model) so the suite exercises every path on a CPU. A figure that cannot be
measured here is ``null`` with a ``reason``; the JSON always names every figure.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import bench_parser

SIZES = {
    "merlin": {"arch": "i3_resnet152", "input": [224, 224, 160], "batch": 8, "text": "full", "slices": 300},
    "small": {"arch": "i3_resnet152_mini", "input": [32, 32, 16], "batch": 2, "text": "small", "slices": 40},
}


def _texts(n: int) -> list[str]:
    from operators.contract.findings import load_catalogue

    prompts = [p for f in load_catalogue() for p in f.positive_prompts]
    return [" ".join(prompts[i::n][:12]) for i in range(n)]  # report-length texts


def training_step(size: dict, device: torch.device, steps: int, tmp: Path) -> dict:
    from benchmarks.merlin_stub import SMALL_LONGFORMER, write_longformer_stub
    from training.config import TrainConfig
    from training.loss import clip_loss
    from training.models.factory import make_model
    from training.optim import make_optimizer

    text = write_longformer_stub(tmp / "longformer", **(SMALL_LONGFORMER if size["text"] == "small" else {}))
    cuda = device.type == "cuda"
    cfg = TrainConfig.load(
        "merlin",
        [f"text.model={text}", f"image.arch={size['arch']}", f"preprocess.spatial_size={size['input']}",
         f"train.batch_size={size['batch']}", "text.max_length=512"],
    )  # fmt: skip
    model = make_model(cfg, tmp).to(device)
    model.set_gradient_checkpointing(True)
    model.train()
    opt, _ = make_optimizer(model, cfg)
    precision = "bf16" if cuda else "fp32"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    images = torch.rand(size["batch"], 1, *size["input"], device=device)
    texts = _texts(size["batch"])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(steps + 1):  # the first is the warm-up
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        with autocast:
            img, txt, scale = model(images, texts=texts)
        loss = clip_loss(img.float(), txt.float(), scale.float())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if cuda:
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - t)
        print(f"training step {i}/{steps}{' (warm-up)' if not i else ''}: {time.perf_counter() - t:.2f} s", flush=True)
    med = statistics.median(times)
    if cuda:
        peak, peak_of = torch.cuda.max_memory_allocated(device) / 2**30, "GPU (torch.cuda.max_memory_allocated)"
    else:
        import resource

        peak, peak_of = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "process RSS (ru_maxrss)"
    return {
        "arch": size["arch"],
        "input": size["input"],
        "batch": size["batch"],
        "precision": precision,
        "grad_checkpointing": True,
        "steps_timed": steps,
        "step_s_median": round(med, 4),
        "images_per_s": round(size["batch"] / med, 3),
        "peak_memory_gib": round(peak, 3),
        "peak_memory_of": peak_of,
    }


def ort_cuda(size: dict, tmp: Path) -> dict:
    """The CUDA provider's load and its parity with the CPU provider, TF32 on and off."""
    import onnxruntime as ort

    from benchmarks.bench_onnx import image_tower
    from operators.contract.scoring import open_session
    from training.onnx_export import export_image_onnx

    path = tmp / "image_encoder.onnx"
    export_image_onnx(image_tower(size["arch"]), path, torch.rand(1, 1, *size["input"]))
    x = np.random.default_rng(0).random((1, 1, *size["input"]), dtype=np.float32)
    cpu_session = open_session(path, ["CPUExecutionProvider"])
    name = cpu_session.get_inputs()[0].name
    ref = cpu_session.run(None, {name: x})[0]
    out: dict = {"available_providers": ort.get_available_providers(), "provider_loaded": False}
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        out["reason"] = "this ONNX Runtime has no CUDA provider (onnxruntime-gpu and CUDA libraries needed)"
        out.update(parity_tf32_on=None, parity_tf32_off=None)
        return out
    for tf32 in ("1", "0"):
        session = ort.InferenceSession(
            str(path), providers=[("CUDAExecutionProvider", {"use_tf32": tf32}), "CPUExecutionProvider"]
        )
        if session.get_providers()[0] != "CUDAExecutionProvider":
            out["reason"] = "the CUDA provider is installed but did not load (its CUDA or cuDNN libraries)"
            out.update(parity_tf32_on=None, parity_tf32_off=None)
            return out
        got = session.run(None, {name: x})[0]
        out["provider_loaded"] = True
        out["parity_tf32_on" if tf32 == "1" else "parity_tf32_off"] = float(np.abs(got - ref).max())
    return out


def dicom_to_sr(size: dict, tmp: Path, runs: int) -> dict:
    """One 512x512xN study through the deploy pipeline (scan, select, decode, preprocess, encoder, SR)."""
    from benchmarks.bench_stages import full_profile_study, merlin_size_package, time_stages
    from operators.contract.package import default_package_dir

    study = full_profile_study(tmp / "study", size["slices"])
    demo = default_package_dir()
    package = demo if size["arch"] != "i3_resnet152" else merlin_size_package(demo, tmp / "pkg")
    result = time_stages(study, package, runs, tmp / "sr")
    total = sum(result["median_s"].values())
    return {
        "study": f"512x512x{size['slices']}",
        "package": result["package"],
        "providers": result["providers"],
        "seconds_median": round(total, 3),
        "stages_median_s": {k: round(v, 4) for k, v in result["median_s"].items()},
        "first_study_s": round(sum(result["first_study"].values()), 3),
        "runs": runs,
    }


def main(argv=None) -> int:
    p = bench_parser("gpu_check", __doc__)
    p.set_defaults(out="results/gpu-check.json")
    p.add_argument("--small", action="store_true", help="test sizes (the suite runs it so on the CPU)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps (after one warm-up)")
    p.add_argument("--runs", type=int, default=3, help="timed DICOM -> SR runs (after one warm-up)")
    args = p.parse_args(argv)
    size = SIZES["small" if args.small else "merlin"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc: dict = {
        "command": "python -m benchmarks.gpu_check" + (" --small" if args.small else "") + f" --out {args.out}",
        "size": "small" if args.small else "merlin",
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
    }
    if device.type != "cuda":
        doc["note"] = "no CUDA device: the figures are the CPU's, for exercising the code paths only"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, fn in (
            ("training_step", lambda: training_step(size, device, args.steps, tmp)),
            ("ort_cuda", lambda: ort_cuda(size, tmp)),
            ("dicom_to_sr", lambda: dicom_to_sr(size, tmp, args.runs)),
        ):
            print(f"== {name}", flush=True)
            try:
                doc[name] = fn()
            except Exception as exc:  # noqa: BLE001 - one failed figure is reported; the others are still measured
                doc[name] = {"error": f"{type(exc).__name__}: {exc}"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 1 if any("error" in doc[k] for k in ("training_step", "ort_cuda", "dicom_to_sr")) else 0


if __name__ == "__main__":
    raise SystemExit(main())
