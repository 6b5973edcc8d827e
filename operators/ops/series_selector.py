"""Chooses the series the model sees (rule in ``operators.pipeline``); a study without one fails cleanly."""

from __future__ import annotations

from monai.deploy.core import Operator, OperatorSpec

from ..pipeline import select_series


class SeriesSelectorOperator(Operator):
    """Inputs: ``study`` (``StudyWork``). Outputs: ``selected_series`` (``StudyWork`` with ``chosen``
    set, or failed with the reason no series is eligible)."""

    def setup(self, spec: OperatorSpec):
        spec.input("study")
        spec.output("selected_series")

    def compute(self, op_input, op_output, context):
        op_output.emit(select_series(op_input.receive("study")), "selected_series")
