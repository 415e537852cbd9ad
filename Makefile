# Two entry points, each setting up .venv on first use:
#   make demo   run the main job on the embedded default (tiny model, sample images)
#   make test   run the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

demo: $(VENV)/.installed
	$(PY) jobs/demo.py

test: $(VENV)/.installed
	$(PY) -m pytest
