"""DICOM UIDs received from outside (headers, associations, manifests) are checked before use."""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading zeros, <= 64 chars."""
    return isinstance(uid, str) and len(uid) <= 64 and _UID.fullmatch(uid) is not None
