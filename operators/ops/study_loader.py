"""First operator: emits the studies found under the input folder, one per tick."""

from __future__ import annotations

import logging

from monai.deploy.core import Fragment, Operator, OperatorSpec

from ..pipeline import StudyWork

log = logging.getLogger("ct-zeroshot")


class StudyLoaderOperator(Operator):
    """Emits ``StudyWork`` items. The folder is scanned once by the application (headers only, files
    grouped by Study/Series Instance UID whatever the layout) so that the count condition is known.

    Inputs: none. Outputs: ``study`` (``StudyWork``: the study's series, nothing chosen yet)."""

    def __init__(self, fragment: Fragment, *args, studies: list[StudyWork], **kwargs):
        self._studies = list(studies)
        super().__init__(fragment, *args, **kwargs)

    def setup(self, spec: OperatorSpec):
        spec.output("study")

    def compute(self, op_input, op_output, context):
        work = self._studies.pop(0)
        log.info("study %s: %d series", work.study_uid, len(work.series))
        op_output.emit(work, "study")
