"""Where the cmc_rec tests find the real data sets: ``$CMC_REC_DATA`` only (the Makefile and CI set it
to the checkout's ``../shared/data``); absent data skips the test with the reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(os.environ["CMC_REC_DATA"]) if os.environ.get("CMC_REC_DATA") else None


def needs(relative: str, what: str) -> pytest.MarkDecorator:
    """Skip unless ``$CMC_REC_DATA/<relative>`` exists, saying why."""
    if ROOT is None:
        return pytest.mark.skipif(True, reason=f"{what}: $CMC_REC_DATA is not set (point it at the data root)")
    return pytest.mark.skipif(not (ROOT / relative).is_file(), reason=f"{what} not at {ROOT / relative}")


needs_ml100k = needs("ml-100k/u1.base", "MovieLens 100K")
needs_douban = needs("monti/douban/training_test_dataset.mat", "Monti et al. Douban")
