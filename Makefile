# `make run`: set up and run the default grid (CPU, SQLite results, HTML leaderboard).
# `make test`: set up, lint (ruff: pyflakes, pycodestyle, import order) and run the test suite (what CI runs).
# `make tasks`: set up and train every attention on the quick tasks (CPU, about 17 minutes on 2 cores).
VENV ?= .venv
STAMP := $(VENV)/.cab-setup

.PHONY: setup bytecode run tasks lint test bench clean

$(STAMP): pyproject.toml scripts/setup.sh requirements/reference-impls.txt
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

# cab's and the tasks' bytecode, written explicitly: where PYTHONDONTWRITEBYTECODE is set (as on the
# development machine) no process writes it, so every process that imports cab (a run's driver, its forkserver,
# each `cab` command a test starts) would compile those modules again (0.3 s of CPU each;
# tests/run/test_resume.py took 59-64 CPU-s with it, 68-70 without). compileall rewrites only what changed.
bytecode: setup
	$(VENV)/bin/python -m compileall -q cab tasks

run: bytecode
	$(VENV)/bin/cab run configs/quick.yaml

tasks: bytecode
	$(VENV)/bin/cab run configs/tasks-quick.yaml

lint: setup
	$(VENV)/bin/ruff check cab tests tasks scripts benchmarks examples

test: lint bytecode
	$(VENV)/bin/python -m pytest -n auto --dist loadgroup

bench: setup
	$(VENV)/bin/python -m pytest benchmarks --benchmark-only

clean:
	rm -rf $(VENV) results/cab.sqlite* results/leaderboard results/tasks-quick.sqlite* results/tasks-quick-leaderboard
