"""The image's self-check: run at build time (a failing check fails the build) and by the image tests.

    python3 /opt/ct-zeroshot/smoke.py [--json FILE]

Checks that ``import monai`` (which imports MONAI Deploy and so Holoscan) works, that every shared
library of Holoscan that the application loads resolves (``ldd``: no "not found"), and that ONNX Runtime
lists the CUDA execution provider. Without a GPU the provider is listed but falls back to the CPU at
session creation; the driver library (``libcuda.so.1``) is the host's, mounted by the NVIDIA Container
Toolkit, so it is the one name allowed to be missing here. Holoscan libraries this application never
loads (``UNUSED``: TensorRT inference, Holoviz on Vulkan, V4L2 capture, NPP colour conversion, UCX's RDMA
transports) are listed with what they lack but do not fail the check: TensorRT and Vulkan would add
gigabytes for operators the application does not use.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

DRIVER = {"libcuda.so.1", "libnvidia-ml.so.1"}  # from the host's driver at run time
# Holoscan libraries the ct-zeroshot application never loads, by file-name prefix, with why. The
# application is Python operators on Holoscan's core; it runs ONNX Runtime through ORT's Python API.
UNUSED = {
    "libholoscan_infer": "Holoscan's InferenceOp backends (TensorRT, libtorch, ORT's C library)",
    "libholoscan_op_inference": "InferenceOp (TensorRT)",
    "libholoscan_op_gpu_resident_inference": "GPU-resident InferenceOp (TensorRT)",
    "_inference": "InferenceOp's Python module (TensorRT)",
    "libholoscan_viz": "Holoviz (Vulkan)",
    "libholoscan_op_holoviz": "HolovizOp (Vulkan)",
    "_holoviz": "HolovizOp's Python module (Vulkan)",
    "libholoscan_op_v4l2": "V4L2 video capture (Ubuntu's libjpeg8)",
    "_v4l2": "V4L2 video capture's Python modules",
    "libholoscan_op_bayer_demosaic": "Bayer demosaicing (NPP)",
    "_bayer_demosaic": "Bayer demosaicing (NPP)",
    "libholoscan_op_format_converter": "video format conversion (NPP)",
    "_format_converter": "video format conversion (NPP)",
    "libholoscan_op_raw_image_processor": "raw camera image processing (NVRTC, driver API)",
    "_raw_image_processor": "raw camera image processing",
    "libuct_ib": "UCX InfiniBand transports (RDMA hardware, distributed apps)",
    "libuct_rdmacm": "UCX RDMA connection manager (RDMA hardware)",
}


def missing_libraries(root: Path) -> dict[str, list[str]]:
    """Every shared object under ``root`` with the libraries ``ldd`` cannot find."""
    out: dict[str, list[str]] = {}
    for so in sorted(p for p in root.rglob("*.so*") if p.is_file() and not p.is_symlink()):
        text = subprocess.run(["ldd", str(so)], capture_output=True, text=True).stdout
        lost = sorted(set(re.findall(r"^\s*(\S+) => not found", text, re.M)))
        if lost:
            out[str(so.relative_to(root))] = lost
    return out


def check() -> dict:
    import holoscan
    import monai
    import monai.deploy.core  # noqa: F401  (the SDK the application is built on)
    import onnxruntime as ort

    report: dict = {
        "python": sys.version.split()[0],
        "monai": monai.__version__,
        "holoscan": holoscan.__version__,
        "onnxruntime": ort.__version__,
        "ort_device": ort.get_device(),
        "ort_providers": ort.get_available_providers(),
    }
    lost = missing_libraries(Path(holoscan.__file__).parent)
    unused = {k: v for k, v in lost.items() if Path(k).name.startswith(tuple(UNUSED))}
    used = {k: [n for n in v if n not in DRIVER] for k, v in lost.items() if k not in unused}
    report["holoscan_missing"] = {k: v for k, v in used.items() if v}
    report["holoscan_driver_only"] = sorted(k for k, v in used.items() if not v)
    report["holoscan_unused_missing"] = {
        k: {"missing": v, "not loaded by this app": next(w for p, w in UNUSED.items() if Path(k).name.startswith(p))}
        for k, v in unused.items()
    }
    problems = []
    if report["holoscan_missing"]:
        problems.append(f"Holoscan libraries with missing dependencies: {report['holoscan_missing']}")
    if "CUDAExecutionProvider" not in report["ort_providers"]:
        problems.append(f"ONNX Runtime lists no CUDAExecutionProvider: {report['ort_providers']}")
    report["problems"] = problems
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, help="also write the report here")
    args = ap.parse_args(argv)
    report = check()
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    for p in report["problems"]:
        print(f"smoke: {p}", file=sys.stderr)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
