"""The device a training-side command runs on (``--device``): named, never silently replaced."""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def torch_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU when PyTorch sees one, else the CPU; ``cpu``; ``cuda`` or ``cuda:N``. A GPU
    that is named but not there is an error, not a fallback to the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: PyTorch sees no CUDA device here (torch {torch.__version__})")
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
        return device
    raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
