"""The floors of the library: each imports only from the floors below it.

  common < layers < model < training < serving < benchmarks

`pipelines` stands beside the library and imports none of it; the library imports
`pipelines` from the training floor up. Nothing in the library or the pipelines imports the
programs (`meliad_tools`), and no docstring or comment cites documents that do not ship
with the code.
"""

import ast
import os
import re

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOORS = ("common", "layers", "model", "training", "serving", "benchmarks")
# The lowest floor that may use the pipelines.
PIPELINES_FROM = FLOORS.index("training")


def _modules(package):
  for directory, _, names in os.walk(os.path.join(ROOT, package)):
    for name in sorted(names):
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        yield os.path.relpath(path, ROOT), path


def _imports(path):
  """Every module name an import statement of the file names (`from a import b` gives a.b)."""
  with open(path) as f:
    tree = ast.parse(f.read())
  names = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names += [f"{node.module}.{alias.name}" for alias in node.names]
  return names


def _floor(module_name):
  parts = module_name.split(".")
  if parts[0] != "meliad_tf" or len(parts) < 2 or parts[1] not in FLOORS:
    return None
  return FLOORS.index(parts[1])


def test_every_library_module_is_in_a_floor():
  for relative, _ in _modules("meliad_tf"):
    parts = relative.split(os.sep)
    assert len(parts) == 2 and parts[1] == "__init__.py" or parts[1] in FLOORS, relative


@pytest.mark.parametrize("relative, path", list(_modules("meliad_tf")))
def test_imports_point_down(relative, path):
  parts = relative.split(os.sep)
  if len(parts) < 3:
    return
  own = FLOORS.index(parts[1])
  for name in _imports(path):
    floor = _floor(name)
    assert floor is None or floor <= own, f"{relative} imports {name}, a floor above it"
    if name.split(".")[0] == "pipelines":
      assert own >= PIPELINES_FROM, f"{relative} imports {name} below the training floor"
    assert not name.startswith("meliad_tools"), f"{relative} imports the programs: {name}"


@pytest.mark.parametrize("relative, path", list(_modules("pipelines")))
def test_pipelines_import_neither_the_library_nor_the_programs(relative, path):
  for name in _imports(path):
    assert not name.startswith(("meliad_tf", "meliad_tools")), f"{relative} imports {name}"


def test_nothing_cites_documents_that_do_not_ship():
  """Section signs point into documents outside the repository; a Markdown file named in the
  code must be one of the repository's."""
  shipped = {name for _, _, names in os.walk(ROOT) for name in names if name.endswith(".md")}
  markdown = re.compile(r"([\w-]+\.md)\b")
  for package in ("meliad_tf", "pipelines", "tools", "tests", "configs"):
    for directory, _, names in os.walk(os.path.join(ROOT, package)):
      for name in names:
        path = os.path.join(directory, name)
        if name.endswith((".py", ".gin")):
          with open(path) as f:
            for number, line in enumerate(f, 1):
              assert "\u00a7" not in line, f"{path}:{number}: {line.strip()}"
              for cited in markdown.findall(line):
                assert cited in shipped, f"{path}:{number}: {cited}"
