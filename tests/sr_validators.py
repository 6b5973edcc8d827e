"""The three DICOM SR validators (dciodvfy, DCMTK dsrdump, PixelMed DicomSRValidator); each catches
defects the others miss. Each function returns the list of problems (empty = valid)."""

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PIXELMED_JAR = Path("/usr/share/java/pixelmed.jar")
# PixelMed's TID 1500 rules lack qualitative evaluations: a gap in its rules, not an error.
PIXELMED_KNOWN = "Content Item not in template"


def have_validators() -> bool:
    return bool(shutil.which("dciodvfy") and shutil.which("dsrdump") and shutil.which("java") and PIXELMED_JAR.exists())


def dciodvfy(path: Path) -> list[str]:
    p = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith("Error")]
    return errors or ([f"dciodvfy exit {p.returncode}"] if p.returncode else [])


def dsrdump(path: Path) -> list[str]:
    p = subprocess.run(["dsrdump", "-v", "+Pt", str(path)], capture_output=True, text=True)
    errors = [line for line in (p.stdout + p.stderr).splitlines() if line.startswith(("E:", "F:"))]
    return errors or ([f"dsrdump exit {p.returncode}"] if p.returncode else [])


def pixelmed(path: Path) -> list[str]:
    p = subprocess.run(
        [
            "java",
            "-Djdk.xml.xpathExprGrpLimit=0",
            "-Djdk.xml.xpathExprOpLimit=0",
            "-Djdk.xml.xpathTotalOpLimit=0",
            "-cp",
            str(PIXELMED_JAR),
            "com.pixelmed.validate.DicomSRValidator",
            str(path),
        ],
        capture_output=True,
        text=True,
    )
    out = (p.stdout + p.stderr).splitlines()
    problems = [
        line
        for line in out
        if line.strip() and (line.startswith("Error") or (line.startswith("Warning") and PIXELMED_KNOWN not in line))
    ]
    if not any("Root Template Validation Complete" in line for line in out):
        problems.append("PixelMed did not complete TID 1500 validation: " + " | ".join(out[-5:]))
    return problems


def validate_all(paths: list[Path], pixelmed_files: int | None = None) -> dict[str, list[str]]:
    """{file: problems} over all three validators. PixelMed costs ~25 s a file (its XPath rules): it runs
    two at a time, on the first ``pixelmed_files`` only when given (SRs of one writer share a structure)."""
    problems = {str(p): dciodvfy(p) + dsrdump(p) for p in paths}
    checked = paths[:pixelmed_files] if pixelmed_files is not None else paths
    with ThreadPoolExecutor(2) as pool:
        for p, found in zip(checked, pool.map(pixelmed, checked)):
            problems[str(p)] += found
    return {k: v for k, v in problems.items() if v}
