"""Smoke test of ``python -m benchmarks.bench_memory`` (docs/performance.md, Memory per study): one tiny
study lengthened to 20 slices, one worker."""

import json

from benchmarks.bench_memory import main


def test_memory_benchmark_writes_its_table(tmp_path):
    args = ["--out", str(tmp_path), "--studies", "1", "--profile", "tiny", "--workers", "1", "--slices", "20"]
    assert main(args) == 0
    doc = json.loads((tmp_path / "memory_per_study.json").read_text())
    assert doc["study_shape"].endswith("x20")
    (row,) = doc["results"]
    assert row["studies_ok"] == 1 and row["exit"] == 0
    assert 100 < row["largest_process_mib"] <= row["tree_mib"]  # a worker with a model is well over 100 MiB
    assert "--slices 20" in (tmp_path / "memory_per_study.md").read_text()
