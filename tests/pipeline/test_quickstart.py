"""``walsh quickstart`` end to end: builtin corpus -> shards -> Ray + DeepSpeed ZeRO-2 training
-> MLflow -> a sample. Slow (a couple of minutes on 2 cores) but CI runs it.

The GPT-2 ranks are resolved as a user's machine would (tiktoken's cache, else the hash-checked
file inside the openai-whisper sdist on the package index), into a cache kept across runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


@pytest.mark.timeout(900)
def test_quickstart_end_to_end(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "quickstart", "--dir", str(tmp_path), "--steps",
         "30"], capture_output=True, text=True, timeout=880, env=env, check=False,
    )
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-5000:]
    for stage in ("== 1/4", "== 2/4", "== 3/4", "== 4/4", "mlflow ui --backend-store-uri"):
        assert stage in out
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0] - 1.0  # the loss falls clearly
    assert (tmp_path / "run" / "mlflow.db").is_file()
    assert (tmp_path / "data" / "manifest.json").is_file()
    assert (tmp_path / "run" / "model_fp32.pt").is_file()
