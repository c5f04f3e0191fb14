# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is created on first use and re-installed only when the metadata changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench-legacy bench-cloud bench-bridge clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/bridgectl legacy run --supernodes 8 --users 200 --rate 50 --faults light \
		--seed 7 --port 47100 --duration 20

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

bench-legacy: $(STAMP)
	$(BIN)/python bench/bench_legacy.py

bench-cloud: $(STAMP)
	$(BIN)/python bench/bench_cloud.py

bench-bridge: $(STAMP)
	$(BIN)/python bench/bench_bridge.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
