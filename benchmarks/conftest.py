"""Benchmarks reproduce the published tables; they run only when asked.

    pytest benchmarks/ --benchmark            # full budgets (long; see benchmarks/README.md)
    pytest benchmarks/ --benchmark-smoke      # tiny budgets, minutes: CI runs this so they never rot
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("benchmark")
    group.addoption("--benchmark", action="store_true", help="run the benchmarks at their full budget")
    group.addoption("--benchmark-smoke", action="store_true", help="run the benchmarks at a tiny budget")
    group.addoption("--data-root", default=None, help="folder holding the real data sets")
    group.addoption("--model", default=None, help="hub id or local path of a real diffusion checkpoint")
    group.addoption("--clip-model", default="ViT-B-32", help="open_clip model name for the CLIP score")
    group.addoption("--clip-pretrained", default=None, help="open_clip pretrained tag or weights file")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--benchmark") or config.getoption("--benchmark-smoke"):
        return
    skip = pytest.mark.skip(reason="benchmarks run only with --benchmark or --benchmark-smoke")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def budget(request: pytest.FixtureRequest) -> str:
    """'full' with --benchmark, 'smoke' with --benchmark-smoke."""
    return "full" if request.config.getoption("--benchmark") else "smoke"


@pytest.fixture(scope="session")
def data_root(request: pytest.FixtureRequest) -> Path:
    """--data-root, else ../shared/data beside the checkout (the benchmarks' harness only: the
    libraries themselves read $FEWSHOT_CCD_DATA / $CMC_REC_DATA, which the Makefile sets to it)."""
    given = request.config.getoption("--data-root")
    return Path(given) if given else ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def results_dir(budget: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """benchmarks/results/ at the full budget; a temporary folder in smoke mode (never overwrite real results)."""
    if budget == "smoke":
        return tmp_path_factory.mktemp("results")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    return RESULTS_DIR
