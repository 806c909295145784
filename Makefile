# Two commands for a fresh machine (see README):
#   make demo   install, reproduce the puzzle with the default run, then the default study
#   make test   install, then run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast lint bench ui ui-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# torch first, pinned to the CPU build on this machine's disk: an unpinned torch pulls a multi-GB CUDA build
install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"

demo: install
	$(BIN)/rlhf-sweep run
	$(BIN)/rlhf-sweep sweep beta_clip_frontier --workers 2

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not e2e"

lint: install
	$(BIN)/ruff check rlhf_sweep tests bench
	$(BIN)/lint-imports

# PPO vs its compute floor and TRL (the bench extra), sweep workers, cost growth; then the default run's wall time; time per trial per algorithm
bench: install
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python bench/run.py
	$(BIN)/python bench/run_time.py
	$(BIN)/python bench/algos.py

# optuna-dashboard and the MLflow UI on loopback for the most recent study under OUT (Ctrl-C stops both)
OUT ?= outputs
ui: install
	$(BIN)/python -m pip install -q -e ".[ui]"
	$(BIN)/rlhf-sweep ui $(OUT)

# the smoke study in both dashboards, opened in headless Chromium: four screenshots under outputs/bench/ui_check/
ui-check: install
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { echo "ui-check needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver"; exit 2; }
	$(BIN)/python -m pip install -q -e ".[ui,bench]"
	$(BIN)/python bench/ui_check.py

clean:
	rm -rf outputs .pytest_cache .ruff_cache
