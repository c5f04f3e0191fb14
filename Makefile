# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# The venv is created on first use and re-installed only when the metadata changes.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test chaos swarm lint bench bench-legacy bench-cloud bench-bridge bench-reconcile bench-sim clean

$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# The whole migration end to end on the embedded PostgreSQL (under ./.bridge); DEMO_ARGS adds
# flags, e.g. make demo DEMO_ARGS="--faults heavy --duration 120".
demo: $(STAMP)
	$(BIN)/bridgectl demo $(DEMO_ARGS)

# Every chaos scenario over 3 seeds (about 20 minutes); a bounded subset runs in `make test`.
# CHAOS_ARGS adds flags, e.g. make chaos CHAOS_ARGS="--scenario partition --seeds 5".
chaos: $(STAMP)
	$(BIN)/bridgectl chaos $(CHAOS_ARGS)

# A swarm of whole-migration simulations: 20 seeds of 2 simulated days, 200 users each
# (about 15 minutes); prints each failing seed with the command that replays it.
# SWARM_ARGS adds or overrides flags, e.g. make swarm SWARM_ARGS="--faults heavy".
swarm: $(STAMP)
	$(BIN)/bridgectl simulate --seeds 1..20 --days 2 --users 200 --supernodes 8 $(SWARM_ARGS)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Every benchmark, each run BENCH_REPEAT times (median, min, max): prints a JSON document and
# a table, writes bench/results.json and bench/scaling.png (about 13 minutes on 2 cores).
# BENCH_ARGS adds flags, e.g. make bench BENCH_ARGS="--quick" or "--only bridge reconcile".
BENCH_REPEAT ?= 3
bench: $(STAMP)
	$(BIN)/python -c 'import matplotlib' 2>/dev/null || $(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/python bench/run_all.py --repeat $(BENCH_REPEAT) $(BENCH_ARGS)

bench-legacy: $(STAMP)
	$(BIN)/python bench/bench_legacy.py

bench-cloud: $(STAMP)
	$(BIN)/python bench/bench_cloud.py

bench-bridge: $(STAMP)
	$(BIN)/python bench/bench_bridge.py

bench-reconcile: $(STAMP)
	$(BIN)/python bench/bench_reconcile.py

# The whole-migration simulation's pace: 2 simulated days of 2,000 users (several minutes).
bench-sim: $(STAMP)
	$(BIN)/python bench/bench_sim.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
