"""Chooses the series the model sees (rule in ``operators.pipeline``); a study without one fails cleanly."""

from __future__ import annotations

from monai.deploy.core import Operator, OperatorSpec

from ..pipeline import select_series


class SeriesSelectorOperator(Operator):
    def setup(self, spec: OperatorSpec):
        spec.input("study")
        spec.output("study")

    def compute(self, op_input, op_output, context):
        op_output.emit(select_series(op_input.receive("study")), "study")
