"""Result files: the deploy side's one atomic writer (``operators/files.py``), re-exported here for the
training side's modules."""

from operators.files import atomic_path, write_atomic, write_json

__all__ = ["atomic_path", "write_atomic", "write_json"]
