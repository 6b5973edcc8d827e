"""MONAI Deploy (Holoscan) operators of the application, one per file; each is a thin wrapper over a
stage of ``operators.pipeline`` and passes a ``StudyWork`` per study downstream."""
