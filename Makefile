# Set-up is part of every target: the virtual environment lives in .venv inside the clone and
# is rebuilt only when setup.py changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/main

.PHONY: main test test-all bench

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

main: $(STAMP)
	$(VENV)/bin/meliad-data --source=python_stdlib --batch_size=4 --sequence_length=512 --num_batches=3

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' tests
