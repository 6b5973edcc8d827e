"""One image-encoder pass per study (ONNX Runtime, CUDA provider when it loads) and Merlin's rule."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import infer
from ..zeroshot import ZeroShotModel


class ZeroShotOperator(Operator):
    def __init__(self, fragment: Fragment, *args, model: ZeroShotModel, **kwargs):
        self._model = model
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context):
        op_output.emit(infer(op_input.receive("study"), self._model), "study")
