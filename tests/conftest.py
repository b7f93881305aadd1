"""Shared fixtures. Tiny pipelines are built once per session (seconds) and never downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# the suite runs on 2 CPU cores; keep torch from oversubscribing them
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def clip_tokenizer():
    pytest.importorskip("diffusers")
    from tokenprune_diffusers.tokenizer import load_clip_tokenizer

    return load_clip_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipe():
    pytest.importorskip("diffusers")
    from tokenprune_diffusers.models import tiny_pipeline

    return tiny_pipeline(seed=0)


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin contention on the shared 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# The libraries read their data only from a path, an environment variable or their cache folder;
# like the Makefile, the test suite points the variables at the checkout's ../shared/data when it
# exists and they are not set, so that `pytest` run by hand finds the same data as `make test`.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if _SHARED_DATA.is_dir():
    for _var in ("FEWSHOT_CCD_DATA", "CMC_REC_DATA"):
        os.environ.setdefault(_var, str(_SHARED_DATA))
