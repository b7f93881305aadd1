"""What a newcomer meets first: the distribution's name and extras, the error of a base install,
and the data locations that the Makefile passes on."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _import_without(blocked: str) -> subprocess.CompletedProcess:
    code = f"import sys; sys.modules[{blocked!r}] = None\nimport tokenprune_diffusers"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_base_install_says_which_extra_to_install():
    out = _import_without("diffusers")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError:") and "'diffusion' extra" in last
    assert "pip install 'tokenprune-diffusers[diffusion]'" in last


def test_too_old_diffusers_names_the_version_needed():
    out = _import_without("diffusers.hooks")
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and "diffusers >= 0.33" in last and "diffusers.hooks" in last


def test_distribution_name_extras_and_hints_agree():
    from tokenprune_diffusers._extras import DIFFUSION_INSTALL, DISTRIBUTION, MIN_DIFFUSERS

    project = PYPROJECT["project"]
    assert project["name"] == DISTRIBUTION == "tokenprune-diffusers"
    extras = project["optional-dependencies"]
    assert {"diffusion", "fewshot", "cmc", "ranking", "all", "dev"} <= set(extras)
    assert f"diffusers>={MIN_DIFFUSERS}" in extras["diffusion"][0]
    for name in ("all", "dev"):  # self-references use the distribution's own name and known extras
        for req in extras[name]:
            if req.startswith(DISTRIBUTION):
                listed = req[len(DISTRIBUTION) + 1:-1].split(",")
                assert set(listed) <= set(extras), req
    assert "example.invalid" not in (ROOT / "pyproject.toml").read_text()
    assert f"{DISTRIBUTION}[diffusion]" in DIFFUSION_INSTALL
    readme = (ROOT / "README.md").read_text()
    for extra in ("diffusion", "fewshot", "cmc", "all"):
        assert f'pip install "{DISTRIBUTION}[{extra}]"' in readme, extra


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("preset", [None, "/somewhere/else"])
def test_makefile_passes_the_checkout_data_on(preset):
    env = {k: v for k, v in os.environ.items() if k not in ("FEWSHOT_CCD_DATA", "CMC_REC_DATA", "MAKEFLAGS")}
    if preset:
        env["FEWSHOT_CCD_DATA"] = preset
    out = subprocess.run(["make", "-s", "data-env"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    shared = (ROOT.parent / "shared" / "data").resolve()
    got = dict(line.split("=", 1) for line in out.stdout.strip().splitlines())
    if shared.is_dir():
        assert got["CMC_REC_DATA"] == str(shared)
        assert got["FEWSHOT_CCD_DATA"] == (preset or str(shared))
    else:
        assert got["CMC_REC_DATA"] == "" and got["FEWSHOT_CCD_DATA"] == (preset or "")


@pytest.mark.parametrize("builder", ["tiny_pipeline", "load_toy_pipeline"])
def test_pipelines_built_by_the_library_show_progress(builder, capfd):
    pytest.importorskip("diffusers")
    import torch

    if builder == "tiny_pipeline":
        from tokenprune_diffusers.models import tiny_pipeline as build
    else:
        from tokenprune_diffusers.toy import load_toy_pipeline as build
    pipe = build()
    capfd.readouterr()
    pipe("a red circle", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0))
    assert "2/2" in capfd.readouterr().err  # diffusers' tqdm bar over the denoising steps
