"""The contract between training and deployment, imported by both sides.

The model package (``manifest``: the typed manifest; ``package``: loading and verification), how a package
scores a volume (``scoring``: ONNX Runtime sessions and the one decision rule; ``prompts``: the prompt
table), the findings (``findings`` and ``findings.json``: the catalogue; ``custom_findings``: a site's own),
the text rule (``textnorm``), the one preprocessing definition (``preprocessing``, over ``volume``), series
reading (``dicom_series``), and the small pieces every writer and reader shares (``uids``, ``files``: the one
atomic writer, ``phi``: what may reach a log, ``validation``: pydantic's errors in a file's terms).
Nothing here imports the front ends or ``training``.
"""
