"""What a new user meets first: the version, the Python versions claimed, the extras, the
licence, and the Makefile's choice of interpreter."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys

import pytest

import meliad_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIMED_PYTHONS = ("3.11", "3.12")


def _read(name):
  with open(os.path.join(ROOT, name), encoding="utf-8") as f:
    return f.read()


def test_every_program_answers_version():
  programs = dict(re.findall(r'"(meliad-[a-z]+)=(meliad_tools\.[a-z_]+):run"', _read("setup.py")))
  assert len(programs) >= 9
  # One process imports TensorFlow; each program runs in a fork of it, as from its script.
  script = f"""
import contextlib, importlib, io, json, os, sys
import tensorflow
answers = {{}}
for program, module in {json.dumps(programs)}.items():
  read, write = os.pipe()
  if os.fork() == 0:
    os.close(read)
    sys.argv = [program, "--version"]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
      try:
        importlib.import_module(module).run()
      except SystemExit:
        pass
    os.write(write, output.getvalue().encode())
    os._exit(0)
  os.close(write)
  with os.fdopen(read) as pipe:
    answers[program] = pipe.read()
  os.wait()
print(json.dumps(answers))
"""
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=environment, cwd=ROOT).stdout
  answers = json.loads(output.strip().splitlines()[-1])
  assert answers == {program: f"meliad-tf {meliad_tf.__version__}\n" for program in programs}


def test_the_version_is_written_once_and_is_what_the_package_reports():
  assert re.fullmatch(r"\d+\.\d+\.\d+", meliad_tf.__version__)
  assert importlib.metadata.version("meliad-tf") == meliad_tf.__version__
  # setup.py reads it from the package rather than repeating it.
  assert not re.search(r"version\s*=\s*['\"]", _read("setup.py"))


def _python_range(specifier):
  """(lowest, first excluded) minor versions of a `>=3.X,<3.Y` specifier, as (3, X)."""
  lower = re.search(r">=\s*3\.(\d+)", specifier)
  upper = re.search(r"<\s*3\.(\d+)", specifier)
  return (3, int(lower.group(1))) if lower else None, (3, int(upper.group(1))) if upper else None


def test_the_claimed_pythons_are_those_every_pinned_dependency_supports():
  requires_python = importlib.metadata.metadata("meliad-tf")["Requires-Python"]
  assert _python_range(requires_python) == ((3, 11), (3, 13))
  claimed = [tuple(int(p) for p in v.split(".")) for v in CLAIMED_PYTHONS]
  for requirement in importlib.metadata.requires("meliad-tf"):
    if "extra ==" in requirement:
      continue
    name = re.split(r"[=<>\[; ]", requirement)[0]
    dependency = importlib.metadata.metadata(name).get("Requires-Python") or ""
    lowest, excluded = _python_range(dependency)
    for version in claimed:
      assert lowest is None or version >= lowest, (name, dependency, version)
      assert excluded is None or version < excluded, (name, dependency, version)
  readme = _read("README.md")
  assert f"Python {CLAIMED_PYTHONS[0]}-{CLAIMED_PYTHONS[-1]}" in readme
  assert "make PYTHON=python3.12 main" in readme


@pytest.mark.parametrize("version, accepted", [("3.10", False), ("3.11", True), ("3.12", True),
                                               ("3.13", False)])
def test_make_refuses_an_unsupported_python_and_names_the_way_out(tmp_path, version, accepted):
  interpreter = tmp_path / "python"
  interpreter.write_text(f"#!/bin/sh\necho {version}\n")
  interpreter.chmod(0o755)
  result = subprocess.run(["make", "--no-print-directory", "-C", ROOT, "check-python",
                           f"PYTHON={interpreter}", "GOALS=main"],
                          capture_output=True, text=True, check=False)
  assert (result.returncode == 0) == accepted, result.stderr
  if not accepted:
    assert f"is {version}; name another, e.g. make PYTHON=python3.12 main" in result.stderr


def test_scann_is_an_extra_not_a_requirement():
  scann = [r for r in importlib.metadata.requires("meliad-tf") if r.startswith("scann")]
  assert scann and all('extra == "scann"' in r or 'extra == "test"' in r for r in scann), scann
  assert any(r.endswith('extra == "scann"') for r in scann)


def test_the_licence_is_apache_2_and_the_notice_names_meliad():
  licence = _read("LICENSE")
  assert licence.lstrip().startswith("Apache License\n                           Version 2.0")
  assert "END OF TERMS AND CONDITIONS" in licence
  metadata = importlib.metadata.metadata("meliad-tf")
  assert metadata["License"] == "Apache-2.0"
  assert {"LICENSE", "NOTICE"} <= set(metadata.get_all("License-File"))
  notice = _read("NOTICE")
  assert "https://github.com/google-research/meliad" in notice
  assert "Apache License, Version 2.0" in notice and "configs/" in notice
