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
	$(VENV)/bin/meliad-train --gin_file=base_htrans.gin --gin_file=size/tiny_test.gin \
	  --gin_file=tasks/python_stdlib_bytes.gin --gin_file=main_job.gin \
	  --workdir=$(WORKDIR) --alsologtostderr
	$(VENV)/bin/meliad-eval --workdir=$(WORKDIR) --max_documents=4 --output=$(WORKDIR)/eval.json

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q -m '' tests

bench: $(STAMP)
	$(VENV)/bin/meliad-bench all
