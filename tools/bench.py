"""meliad-bench: speed of the pipeline and of each model family, printed as JSON.

  meliad-bench data|train|memory|recurrent|eval [flags of that benchmark]
  meliad-bench all        every benchmark, one after another, as one JSON object

Each benchmark is a module `meliad_tools.bench_<name>` with a `run()` entry point.
"""

import importlib
import importlib.util
import json
import subprocess
import sys

BENCHMARKS = ("data", "train", "memory", "recurrent", "eval", "profile")


def _available():
  # find_spec, not import: each benchmark defines its own absl flags.
  return [name for name in BENCHMARKS
          if importlib.util.find_spec(f"meliad_tools.bench_{name}") is not None]


def _run_all():
  results = {}
  for name in _available():
    process = subprocess.run([sys.executable, "-m", f"meliad_tools.bench_{name}"],
                             capture_output=True, text=True, check=False)
    if process.returncode:
      results[name] = {"error": process.stderr.strip().splitlines()[-1:]}
      continue
    results[name] = json.loads(process.stdout[process.stdout.index("{"):])
  print(json.dumps(results, indent=1))


def run():
  names = _available()
  if len(sys.argv) < 2 or sys.argv[1] not in names + ["all"]:
    sys.stderr.write(f"usage: meliad-bench {{{'|'.join(names + ['all'])}}} [flags]\n")
    return 2
  name = sys.argv[1]
  if name == "all":
    _run_all()
    return 0
  sys.argv = [f"meliad-bench {name}"] + sys.argv[2:]
  return importlib.import_module(f"meliad_tools.bench_{name}").run()


if __name__ == "__main__":
  sys.exit(run())
