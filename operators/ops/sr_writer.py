"""Writes one Comprehensive 3D SR (TID 1500) per successful study and records every study's outcome."""

from __future__ import annotations

from pathlib import Path

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..contract.scoring import ZeroShotModel
from ..pipeline import StudyWork, contained, write_report


class SRWriterOperator(Operator):
    """Inputs: ``findings`` (``StudyWork``). Outputs: none; the SR file in the output folder and the
    study's outcome appended to ``results``."""

    def __init__(
        self, fragment: Fragment, *args, model: ZeroShotModel, output_folder: Path, results: list[StudyWork], **kwargs
    ):
        self._model = model
        self._out = Path(output_folder)
        self._results = results
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.input("findings")

    def compute(self, op_input, op_output, context):
        write = contained(lambda work: write_report(work, self._model, self._out), "writing the SR")
        self._results.append(write(op_input.receive("findings")))
