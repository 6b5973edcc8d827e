"""DICOM UIDs received from outside (headers, associations, manifests) are checked before use."""

from __future__ import annotations

import re

_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading zeros, <= 64 chars."""
    return isinstance(uid, str) and len(uid) <= 64 and _UID.fullmatch(uid) is not None


UID_ROOT_ENV = "CTZS_UID_ROOT"  # a site's UID root for the UIDs this module's outputs get (SR, SEG)
_MAX_ROOT = 40  # leaves 24 characters of the derived UID for the hash of its sources


def check_uid_root(root: str, where: str = UID_ROOT_ENV) -> str:
    """A site's UID root (an organisation's registered prefix, e.g. 1.2.840.99999.7): a valid UID of at most
    40 characters, so the UIDs derived under it keep 24 digits of hash. Returned with its trailing dot."""
    root = str(root).strip().rstrip(".")
    if not is_valid_uid(root) or len(root) > _MAX_ROOT:
        raise ValueError(
            f"{where}: {root!r} is not a usable UID root (digits and dots, no leading zeros, "
            f"at most {_MAX_ROOT} characters)"
        )
    return root + "."


def derived_uid(*sources: str) -> str:
    """A UID derived from ``sources`` (the same sources, the same UID) under the site's root
    (``$CTZS_UID_ROOT``), or pydicom's public root when none is set."""
    import os

    from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

    root = os.environ.get(UID_ROOT_ENV)
    prefix = check_uid_root(root) if root else PYDICOM_ROOT_UID
    return generate_uid(prefix=prefix, entropy_srcs=list(sources))
