"""Reads the chosen series (all transfer syntaxes pydicom decodes on CPU), builds the volume with its
geometry and applies the model package's preprocessing."""

from __future__ import annotations

from monai.deploy.core import Fragment

from ..pipeline import SeriesToModelInput
from .stage import StageOperator


class SeriesToTensorOperator(StageOperator):
    """Inputs: ``selected_series`` (``StudyWork``). Outputs: ``model_input`` (``StudyWork`` whose
    ``tensor`` is the preprocessed (1, X, Y, Z) volume, or failed with the reason). Decoding and
    preprocessing are one stage: the volume is never held at full size longer than needed."""

    ports = ("selected_series", "model_input")

    def __init__(self, fragment: Fragment, *args, preprocessor: SeriesToModelInput, **kwargs):
        super().__init__(fragment, *args, stage=preprocessor, **kwargs)
