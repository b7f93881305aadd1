"""The example script runs end to end in smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cmc_testdata import needs_ml100k

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@needs_ml100k
def test_example_smoke_runs():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "cmc_movielens.py"), "--smoke"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("cmc ") for line in lines) and any(line.startswith("svd") for line in lines)
    assert any(line.startswith("ease") for line in lines)
    assert "top-5 items" in out.stdout
