"""Every example runs in its smoke mode."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(name: str, *args: str, timeout: int = 600) -> str:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), *args],
        capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_tokenprune_one_liner_example_smoke():
    pytest.importorskip("diffusers")
    out = run_example("tokenprune_one_liner.py", "--smoke")
    assert "pruned from call: 1" in out and "pruned:" in out and "FLOPs saved" in out


def test_demo_cli_smoke(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_diffusers", "--tiny", "--steps", "3", "--keep-ratio", "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stock :" in proc.stdout and "pruned:" in proc.stdout and "PRUNED" in proc.stdout
    for name in ("stock.png", "pruned.png", "heatmaps.png", "report.json"):
        assert (tmp_path / name).is_file()


def test_demo_cli_default_is_the_embedded_toy_model(tmp_path):
    pytest.importorskip("diffusers")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_diffusers", "--steps", "5", "--threshold", "0.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "model: embedded toy model" in proc.stdout and "small red circle" in proc.stdout
    from PIL import Image

    assert Image.open(tmp_path / "stock.png").size == (32, 32)


@pytest.mark.parametrize("kind, label, options, shown", [
    ("sd3", "SD3-shaped", [], "merge_padding=0.8"),  # no option: the family's defaults
    ("flux", "Flux-shaped", ["--padding", "drop"], "padding: 0/"),  # every padding position dropped
])
def test_demo_cli_runs_the_mmdit_toys(tmp_path, kind, label, options, shown):
    pytest.importorskip("diffusers")
    from tokenprune_diffusers.toy.flux import FLUX_WEIGHTS_DIR
    from tokenprune_diffusers.toy.sd3 import SD3_WEIGHTS_DIR

    weights = {"sd3": SD3_WEIGHTS_DIR, "flux": FLUX_WEIGHTS_DIR}[kind]
    if not (weights / "transformer.safetensors").is_file():
        pytest.skip(f"{kind} toy weights not exported to {weights}")
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_diffusers", f"--toy-{kind}", "--steps", "4", "--repeats", "1", *options,
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"model: embedded {label} toy model" in proc.stdout and shown in proc.stdout
    for name in ("stock.png", "pruned.png", "report.json"):
        assert (tmp_path / name).is_file()


def test_demo_cli_refuses_bad_values_naming_them(tmp_path):
    pytest.importorskip("diffusers")
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_diffusers", "--tiny", "--size", "30", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 2 and "--size must be a positive multiple of 8, got 30" in proc.stderr


def test_demo_cli_refuses_bad_pruning_options_before_building(tmp_path):
    pytest.importorskip("diffusers")
    proc = subprocess.run(
        [sys.executable, "-m", "tokenprune_diffusers", "--warmup", "1.5", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 2 and "warmup must be a number in [0, 1], got 1.5" in proc.stderr
