# Two entry points, each setting up .venv on first use:
#   make discover   run the main job on the embedded default (local Ray, tiny model, sample images)
#   make test       run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: discover test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

discover: $(VENV)/.installed
	$(PY) jobs/discover.py

test: $(VENV)/.installed
	$(PY) -m pytest
