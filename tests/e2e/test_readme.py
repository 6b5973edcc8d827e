"""The README cannot drift from the code: its quick-start blocks run here, verbatim and in order, in an
empty folder; and neither it nor the guides, presets, Makefile or result summaries narrate their history."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MARK = "<!-- quickstart:"


def quickstart_blocks(text: str) -> list[str]:
    """The fenced ``sh`` block after each quick-start marker."""
    blocks = re.findall(re.escape(MARK) + r"[^\n]*-->\n```sh\n(.*?)```", text, flags=re.S)
    assert len(blocks) == text.count(MARK), "a quick-start marker without a ```sh block right after it"
    return blocks


def test_readme_is_short_and_its_quick_starts_are_marked():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert len(quickstart_blocks(text)) == 2


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """Every quick-start block run by bash (-e: a failing command fails the block) in one empty folder."""
    work = tmp_path_factory.mktemp("readme")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    runs = []
    for block in quickstart_blocks(README.read_text()):
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", "ulimit -s 32768 || true\n" + block],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        runs.append(proc)
        assert proc.returncode == 0, f"README block failed:\n{block}\n{proc.stderr[-4000:]}"
    return {"work": work, "runs": runs}


def _summary(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.long
def test_batch_quick_start(quickstart):
    work = quickstart["work"]
    rows = _summary(work / "out/batch/summary.csv")
    assert len(rows) == 8 and {r["status"] for r in rows} == {"ok"}
    assert len(list((work / "out/batch/sr").glob("SR_*.dcm"))) == 8
    assert "embedded demo model" in quickstart["runs"][0].stderr  # no model named: said in the log
    assert "finding" in quickstart["runs"][0].stdout.lower()  # the report's table


@pytest.mark.long
def test_retrain_quick_start(quickstart):
    work = quickstart["work"]
    assert "zero-shot macro F1" in quickstart["runs"][1].stdout and "occlusion" in quickstart["runs"][1].stdout
    m = json.loads((work / "runs/quick/metrics.json").read_text())
    assert 0 <= m["zero_shot"]["macro_f1"] <= 1 and len(m["zero_shot"]["per_finding"]) == 30
    assert set(m["retrieval"]) == {"image_to_report", "report_to_image", "n"}
    assert set(m["occlusion"]) == {"0%", "10%", "25%", "50%"}
    manifest = json.loads((work / "models/quick/manifest.json").read_text())
    assert len(manifest["findings"]) == 30
    rows = _summary(work / "out/quick/summary.csv")
    assert len(rows) == 40 and {r["status"] for r in rows} == {"ok"}


HISTORY = re.compile(
    r"\bsessions? \d+|\bthis session\b|\bmeasured here\b|\bthis 2-core\b|\buntil session\b",
    re.I,
)


def test_no_file_of_the_product_narrates_its_history():
    files = [README, ROOT / "Makefile", ROOT / "CHANGELOG.md"]
    files += sorted((ROOT / "docs").glob("*.md"))
    files += sorted((ROOT / "training" / "presets").rglob("*.yaml"))
    files += sorted((ROOT / "results").glob("*/*.md"))
    found = [f"{p.relative_to(ROOT)}: {m.group(0)!r}" for p in files for m in HISTORY.finditer(p.read_text())]
    assert not found, found
