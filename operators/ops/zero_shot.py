"""One image-encoder pass per study (ONNX Runtime, CUDA provider when it loads) and Merlin's rule."""

from __future__ import annotations

from functools import partial

from monai.deploy.core import Fragment

from ..contract.scoring import ZeroShotModel
from ..pipeline import infer
from .stage import StageOperator


class ZeroShotOperator(StageOperator):
    """Inputs: ``model_input`` (``StudyWork``). Outputs: ``findings`` (``StudyWork`` with ``findings``:
    per-finding probabilities and decisions; the tensor released)."""

    ports = ("model_input", "findings")

    def __init__(self, fragment: Fragment, *args, model: ZeroShotModel, **kwargs):
        super().__init__(fragment, *args, stage=partial(infer, model=model), **kwargs)
