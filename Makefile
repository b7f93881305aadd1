# Two commands for a newcomer:  `make demo`  and  `make test`.
# Both create the virtual environment (.venv) when it is missing and install everything into it.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo test lint bench clean data-env

# The data sets of the tests and benchmarks: the checkout's ../shared/data when that folder exists,
# through the variables the packages read (the library itself never looks beside the checkout).
# A variable already set in the environment wins.
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
FEWSHOT_CCD_DATA ?= $(SHARED_DATA)
CMC_REC_DATA ?= $(SHARED_DATA)
export FEWSHOT_CCD_DATA CMC_REC_DATA
endif

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

## the main job: stock vs pruned on the embedded default pipeline, offline
demo: $(STAMP)
	$(PY) -m tokenprune_diffusers --keep-ratio 0.5 --out outputs/demo

## lint + the whole test suite + the benchmarks at a tiny budget (about 9 min on 2 CPU cores, no network, no weights)
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests benchmarks --benchmark-smoke

## reproduce the published tables (long); see benchmarks/README.md
bench: $(STAMP)
	$(PY) -m pytest benchmarks/ --benchmark -q -s

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

## print the data folders the targets pass on (FEWSHOT_CCD_DATA, CMC_REC_DATA)
data-env:
	@echo FEWSHOT_CCD_DATA=$$FEWSHOT_CCD_DATA
	@echo CMC_REC_DATA=$$CMC_REC_DATA
