# Set-up is part of every target: the virtual environment lives in .venv inside the clone and
# is rebuilt only when setup.py or the version changes. It is made with $(PYTHON), which must be
# Python 3.11 or 3.12 (setup.py's python_requires): where python3 is another version, name one,
# e.g. `make PYTHON=python3.12 main`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
WORKDIR ?= runs/main
# setup.py's python_requires, >=3.11,<3.13.
SUPPORTED_PYTHONS := 3.11 3.12

.PHONY: main test test-all bench check-python

$(STAMP): setup.py meliad_tf/__init__.py
	test -x $(PY) || $(MAKE) --no-print-directory check-python GOALS='$(MAKECMDGOALS)'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

check-python:
	@version=$$($(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])') || { \
	  echo "make: cannot run PYTHON=$(PYTHON); name a Python 3.11 or 3.12, e.g. make PYTHON=python3.12 $(or $(GOALS),main)" >&2; exit 1; }; \
	case " $(SUPPORTED_PYTHONS) " in *" $$version "*) ;; *) \
	  echo "make: meliad-tf needs Python 3.11 or 3.12, and PYTHON=$(PYTHON) is $$version; name another, e.g. make PYTHON=python3.12 $(or $(GOALS),main)" >&2; exit 1;; esac

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
