"""The toy example runs end to end (``--smoke``) on the committed weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from tokenprune_diffusers.toy.model import WEIGHTS_DIR  # noqa: E402
from tokenprune_diffusers.toy.sd3 import SD3_WEIGHTS_DIR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(not (WEIGHTS_DIR / "unet.safetensors").is_file(), reason=f"toy weights not exported to {WEIGHTS_DIR}")
def test_example_smoke(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "toy_prompt_adherence.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| stock | 1 | 2 |" in proc.stdout and "threshold 0.3, warmup 0.2" in proc.stdout
    assert "pruned:" in proc.stdout
    assert (tmp_path / "stock_vs_pruned.png").is_file()


@pytest.mark.slow
@pytest.mark.skipif(not (SD3_WEIGHTS_DIR / "transformer.safetensors").is_file(),
                    reason=f"SD3 toy weights not exported to {SD3_WEIGHTS_DIR}")
def test_example_smoke_sd3(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "toy_prompt_adherence.py"), "--toy", "sd3", "--smoke", "--padding", "drop",
         "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| stock | 1 | 2 |" in proc.stdout and "padding drop" in proc.stdout and "text sequence removed" in proc.stdout
    assert (tmp_path / "stock_vs_pruned.png").is_file()
