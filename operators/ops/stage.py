"""The shape the middle operators share: one pipeline stage (``operators.pipeline``) per operator."""

from __future__ import annotations

from collections.abc import Callable

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import StudyWork, contained


class StageOperator(Operator):
    """One named input and one named output (``ports``, set by each subclass), both ``StudyWork``:
    ``compute`` receives a study, applies the stage given to the constructor and emits the result (a
    failed study passes through every stage as failed, so the SR writer records it; an error the stage
    raises fails that study, ``pipeline.contained``, and never stops the graph)."""

    ports: tuple[str, str]

    def __init__(self, fragment: Fragment, *args, stage: Callable[[StudyWork], StudyWork], **kwargs):
        self._stage = contained(stage, kwargs.get("name", type(self).__name__))  # a study's error fails it alone
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input(self.ports[0])
        spec.output(self.ports[1])

    def compute(self, op_input, op_output, context):
        op_output.emit(self._stage(op_input.receive(self.ports[0])), self.ports[1])
