"""Chooses the series the model sees (rule in ``operators.pipeline``); a study without one fails cleanly."""

from __future__ import annotations

from monai.deploy.core import Fragment

from ..pipeline import select_series
from .stage import StageOperator


class SeriesSelectorOperator(StageOperator):
    """Inputs: ``study`` (``StudyWork``). Outputs: ``selected_series`` (``StudyWork`` with ``chosen``
    set, or failed with the reason no series is eligible)."""

    ports = ("study", "selected_series")

    def __init__(self, fragment: Fragment, *args, **kwargs):
        super().__init__(fragment, *args, stage=select_series, **kwargs)
