"""One image-encoder pass per study (ONNX Runtime, CUDA provider when it loads) and Merlin's rule."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import infer
from ..zeroshot import ZeroShotModel


class ZeroShotOperator(Operator):
    """Inputs: ``model_input`` (``StudyWork``). Outputs: ``findings`` (``StudyWork`` with ``findings``:
    per-finding probabilities and decisions; the tensor released)."""

    def __init__(self, fragment: Fragment, *args, model: ZeroShotModel, **kwargs):
        self._model = model
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("model_input")
        spec.output("findings")

    def compute(self, op_input, op_output, context):
        op_output.emit(infer(op_input.receive("model_input"), self._model), "findings")
