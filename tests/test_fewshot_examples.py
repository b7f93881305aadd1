"""The Omniglot example runs end to end in smoke mode."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fewshot_ccd.data import omniglot_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_omniglot_example_smoke():
    try:
        folder = omniglot_dir()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    for name in ("images_background.npz", "images_evaluation.npz", "all_runs.zip"):
        if not (folder / name).exists():
            pytest.skip(f"Omniglot file {name} not found in {folder}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "fewshot_omniglot.py"), "--smoke"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "5-way 1-shot accuracy" in out.stdout and "Lake's 20 runs error" in out.stdout
    assert "predicted" in out.stdout
