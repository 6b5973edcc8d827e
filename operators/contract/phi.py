"""What may leave a process in logs and reason files: no header value unless the site allows it.

Texts of our own errors name files, UIDs and the problem, never a header value. Texts of third-party
exceptions (pydicom, highdicom, numpy) can quote one (``Invalid value for VR DA: '19541103'``), so
they are reduced to the exception's type unless patient identifiers are allowed in logs
(``log_patient_identifiers: true`` in the listener config, ``--log-patient-identifiers`` on the command
lines, or ``CT_ZEROSHOT_LOG_PATIENT_IDENTIFIERS=1``). Each entry point applies the setting with
``allow_identifiers``; it travels to worker processes through the environment.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV = "CT_ZEROSHOT_LOG_PATIENT_IDENTIFIERS"


def allow_identifiers(allowed: bool) -> None:
    """Let (or stop) header values into logs, here and in processes started from here: third-party
    exception texts, and pydicom's warnings about invalid values, which quote the value
    (``Invalid value for VR DA: '1954-11-03'``), logged and warned."""
    os.environ[ENV] = "1" if allowed else "0"
    logging.getLogger("pydicom").setLevel(logging.NOTSET if allowed else logging.ERROR)
    if not allowed:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def identifiers_allowed() -> bool:
    return os.environ.get(ENV, "0") == "1"


def describe(exc: BaseException) -> str:
    """``Type: text`` where identifiers may be logged, else ``Type`` and a note that the text was withheld."""
    if identifiers_allowed():
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}; its text withheld, it may quote header values"
