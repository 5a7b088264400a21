# Two entry points for a fresh machine (README Quickstart). Both are idempotent.
#   make run    set up .venv, then `dvc repro` the whole pipeline on the built-in default profile
#   make test   set up .venv, then run the test suite
#   make ablate set up .venv, then the ablation grid as DVC experiments and results/ablations.md (README, Ablations)
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test ablate setup

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/python -m pytest -q

ablate: setup
	$(BIN)/restok ablate
