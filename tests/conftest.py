"""Shared fixtures. Tiny pipelines are built once per session (seconds) and never downloaded."""

from __future__ import annotations

import os

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
