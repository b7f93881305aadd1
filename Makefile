# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create the virtual environment (.venv) when it is missing and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the main job: stock vs pruned on the embedded default pipeline, offline
demo: $(STAMP)
	$(PY) -m tokenprune_diffusers --keep-ratio 0.5 --out outputs/demo

## lint + the whole test suite + the benchmarks at a tiny budget (2 CPU cores, no network, no weights)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests benchmarks --benchmark-smoke

## reproduce the published tables (long); see benchmarks/README.md
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark -q -s

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache
