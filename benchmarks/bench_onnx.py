"""Benchmark: Merlin's full-size image encoder, ONNX Runtime vs torch eager, in one process.

``python -m benchmarks.bench_onnx --out results/bench``: random weights in Merlin's
layout (timing does not depend on the values), one preprocessed input of Merlin's size
(1,1,224,224,160) made from a synthetic phantom, a warm-up pass per engine, then ``--runs`` timed
passes per engine, interleaved so that drifting machine load hits both alike. Reports medians, the
ratio torch/ORT, the parity of the two outputs, the threads each engine used, and the machine.
Writes ``onnx_vs_torch.json`` and ``onnx_vs_torch.md`` in ``--out``.

On a GPU host ``--device cuda`` times ORT's CUDA provider (fp32, and fp16 with ``--fp16``, converted
with onnxruntime's float16 tool) against torch on CUDA.
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
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from benchmarks import bench_parser
from benchmarks.merlin_stub import random_merlin_state_dict
from operators.contract.preprocessing import PreprocessSpec
from operators.contract.scoring import open_session, select_providers
from training.models.image import ImageEncoder
from training.onnx_export import export_image_onnx
from training.synth.inputs import synthetic_inputs


class _Normalised(nn.Module):
    def __init__(self, enc: nn.Module):
        super().__init__()
        self.enc = enc

    def forward(self, x):
        return F.normalize(self.enc(x), dim=-1)


def image_tower(arch: str = "i3_resnet152") -> nn.Module:
    """Merlin's image tower with random weights in Merlin's layout (or a small arch, for smoke tests)."""
    torch.manual_seed(0)
    if arch != "i3_resnet152":
        return _Normalised(ImageEncoder(arch, 128)).eval()
    enc = ImageEncoder("i3_resnet152", 512, n_classes=1692)
    sd = {k[len("encode_image.") :]: v for k, v in random_merlin_state_dict().items() if k.startswith("encode_image.")}
    enc.load_state_dict(sd, strict=True)
    return _Normalised(enc).eval()


def run_benchmark(
    out: Path, runs: int = 5, device: str = "cpu", fp16: bool = False, arch: str = "i3_resnet152"
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    spec = PreprocessSpec.merlin() if arch == "i3_resnet152" else PreprocessSpec.tiny()
    x = synthetic_inputs(spec, n=1)
    model = image_tower(arch)
    tdev = torch.device("cuda" if device == "cuda" else "cpu")
    model = model.to(tdev)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = Path(tmp) / "image_encoder.onnx"
        t0 = time.perf_counter()
        export_image_onnx(model.cpu(), onnx_path, torch.from_numpy(x))
        export_s = time.perf_counter() - t0
        model = model.to(tdev)
        engines = {}
        providers = select_providers(device)
        sess = open_session(onnx_path, providers)
        engines["onnxruntime"] = lambda: sess.run(["embedding"], {"image": x})[0]
        if fp16:
            import onnx
            from onnxruntime.transformers.float16 import convert_float_to_float16

            half = Path(tmp) / "image_encoder_fp16.onnx"
            onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(half))
            sess16 = open_session(half, providers)
            engines["onnxruntime_fp16"] = lambda: sess16.run(["embedding"], {"image": x})[0]
        xt = torch.from_numpy(x).to(tdev)

        def torch_run():
            with torch.no_grad():
                y = model(xt)
            if tdev.type == "cuda":
                torch.cuda.synchronize()
            return y.cpu().numpy()

        engines["torch_eager"] = torch_run
        outputs = {name: fn() for name, fn in engines.items()}  # warm-up, and the parity outputs
        times: dict[str, list[float]] = {name: [] for name in engines}
        for _ in tqdm(range(runs), desc="bench rounds", unit="round"):
            for name, fn in engines.items():
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "what": (
            f"Merlin I3D ResNet-152 image encoder (random weights, Merlin's layout), one CT of {x.shape}"
            if arch == "i3_resnet152"
            else f"{arch} image encoder, one input of {x.shape}"
        ),
        "device": device,
        "providers": sess.get_providers(),
        "runs_per_engine": runs,
        "median_s": med,
        "all_s": times,
        "speedup_torch_over_onnxruntime": med["torch_eager"] / med["onnxruntime"],
        "parity_max_abs_diff": float(np.abs(outputs["torch_eager"] - outputs["onnxruntime"]).max()),
        "export_s": export_s,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": __import__("onnxruntime").__version__,
        "cpu_count": os.cpu_count(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "command": (
            f"python -m benchmarks.bench_onnx --out {out} --runs {runs} --device {device}"
            + (" --fp16" if fp16 else "")
            + (f" --arch {arch}" if arch != "i3_resnet152" else "")
        ),
    }
    if torch.cuda.is_available() and device == "cuda":
        result["gpu"] = torch.cuda.get_device_name(0)
    (out / "onnx_vs_torch.json").write_text(json.dumps(result, indent=1))
    lines = [
        f"# ONNX Runtime vs torch eager: {result['what']}",
        "",
        f"`{result['command']}` on {result['cpu_count']} CPU cores ({result['processor']}), "
        f"torch {result['torch']} ({result['torch_threads']} threads), onnxruntime {result['onnxruntime']} "
        f"({', '.join(result['providers'])}).",
        "",
        "| engine | median s/CT | runs |",
        "|---|---:|---:|",
    ]
    for name, m in med.items():
        lines.append(f"| {name} | {m:.2f} | {len(times[name])} |")
    lines += [
        "",
        f"torch / ONNX Runtime: **{result['speedup_torch_over_onnxruntime']:.2f}x**; "
        f"max |embedding difference| {result['parity_max_abs_diff']:.1e}; export took {export_s:.0f} s.",
    ]
    (out / "onnx_vs_torch.md").write_text("\n".join(lines) + "\n")
    return result


def main(argv=None) -> int:
    p = bench_parser("bench_onnx", __doc__)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--fp16", action="store_true", help="also time an fp16 ONNX model (GPU)")
    p.add_argument("--arch", default="i3_resnet152", help="image architecture (default: Merlin's)")
    args = p.parse_args(argv)
    r = run_benchmark(Path(args.out), args.runs, args.device, args.fp16, args.arch)
    print((Path(args.out) / "onnx_vs_torch.md").read_text())
    return 0 if r else 1


if __name__ == "__main__":
    raise SystemExit(main())
