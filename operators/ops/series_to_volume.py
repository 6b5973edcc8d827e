"""Reads the chosen series (all transfer syntaxes pydicom decodes on CPU), builds the volume with its
geometry and applies the model package's preprocessing."""

from __future__ import annotations

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import SeriesToModelInput


class SeriesToTensorOperator(Operator):
    """Inputs: ``selected_series`` (``StudyWork``). Outputs: ``model_input`` (``StudyWork`` whose
    ``tensor`` is the preprocessed (1, X, Y, Z) volume, or failed with the reason)."""

    def __init__(self, fragment: Fragment, *args, preprocessor: SeriesToModelInput, **kwargs):
        self._prep = preprocessor
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("selected_series")
        spec.output("model_input")

    def compute(self, op_input, op_output, context):
        op_output.emit(self._prep(op_input.receive("selected_series")), "model_input")
