"""ct-zeroshot deploy side: DICOM in, zero-shot findings, DICOM SR out.

This package never imports ``training`` or training-only dependencies: the deploy
image ships without them.
"""

__version__ = "0.2.0"
