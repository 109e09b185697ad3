"""``walsh bench staging`` end to end on a tiny corpus (the real run uses >= 50 MB)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.multiprocess
@pytest.mark.timeout(180)
def test_bench_staging_runs_and_reports(tmp_path, ranks_file):
    out = tmp_path / "bench.json"
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "bench", "staging", "--mb", "0.3", "--files", "2",
         "--workers", "1", "2", "--tokenizer", str(ranks_file), "--json", str(out)],
        capture_output=True, text=True, timeout=170, cwd=Path(__file__).parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "outputs byte-identical across worker counts [1, 2]: yes" in res.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["cores"] for r in rows] == [1, 2, 1, 2]
    assert len({r["tokens"] for r in rows}) == 1 and all(r["tokens_per_s"] > 0 for r in rows)
