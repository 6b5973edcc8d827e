"""Reads the chosen series (all transfer syntaxes pydicom decodes on CPU), builds the volume with its
geometry and applies the model package's preprocessing."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import Preprocessor


class SeriesToTensorOperator(Operator):
    def __init__(self, fragment: Fragment, *args, preprocessor: Preprocessor, **kwargs):
        self._prep = preprocessor
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context):
        op_output.emit(self._prep(op_input.receive("study")), "study")
