"""meliad-bench: speed of the pipeline and of each model family, printed as JSON.

  meliad-bench data|train|memory|recurrent|eval [flags of that benchmark]
  meliad-bench profile [flags]  where one step's time goes (see bench_profile.py)
  meliad-bench --version
  meliad-bench all        every benchmark but profile, one after another, as one JSON
                          object on stdout and a summary table on stderr

Each benchmark is a module `meliad_tools.bench_<name>` with a `run()` entry point.
"""

import importlib
import importlib.util
import json
import subprocess
import sys


BENCHMARKS = ("data", "train", "memory", "recurrent", "eval", "profile")
# What `all` runs, with flags that keep it to the sizes the README's table reports (the
# memory benchmark's default sweep up to 128k entries takes hours and 14 GB).
ALL = {"data": [], "train": [], "memory": ["--sizes=32", "--backends=bucketed,exact,scann"],
       "recurrent": [], "eval": []}


def _available():
  # find_spec, not import: each benchmark defines its own absl flags.
  return [name for name in BENCHMARKS
          if importlib.util.find_spec(f"meliad_tools.bench_{name}") is not None]


def _run_all():
  results = {}
  for name, flags in ALL.items():
    if name not in _available():
      continue
    print(f"meliad-bench all: {name}", file=sys.stderr, flush=True)
    process = subprocess.run([sys.executable, "-m", f"meliad_tools.bench_{name}"] + flags,
                             capture_output=True, text=True, check=False)
    if process.returncode:
      results[name] = {"error": process.stderr.strip().splitlines()[-1:]}
      continue
    results[name] = json.loads(process.stdout[process.stdout.index("{"):])
  print(summary_table(results), file=sys.stderr)
  print(json.dumps(results, indent=1))


def summary_rows(results):
  """(what, figure) pairs of the headline numbers of `all`'s results."""
  rows = []
  data = results.get("data", {})
  if "bytes" in data:
    rows.append(("pipeline tokens/s, bytes / SentencePiece",
                 f"{data['bytes']['tokens_per_second']:,.0f} / "
                 f"{data['sentencepiece']['tokens_per_second']:,.0f}"))
  train = results.get("train", {})
  for result in train.get("results", []):
    optimised = result["optimised"]
    row = (f"{optimised['ms_per_train_step']:.0f} ms train, "
           f"{optimised['ms_per_eval_step']:.0f} ms eval "
           f"({optimised['eval_over_train_tokens_per_second']}x the tokens/s), "
           f"MFU {optimised['train_mfu']:.2f}, compile {optimised['compile_seconds_train']:.0f} s")
    if "reference_over_optimised" in result:
      row += f"; reference paths {result['reference_over_optimised']['train_step']}x"
    rows.append((f"{result['config']} step", row))
  for result in results.get("memory", {}).get("timing", {}).get("memory", []):
    rows.append((f"+ {result['size']} memory, {result['backend']}",
                 f"{result['ms_per_train_step_ratio']}x train, "
                 f"{result['ms_per_eval_step_ratio']}x eval"))
  for comparison in results.get("recurrent", {}).get("comparisons", []):
    rows.append((f"+ recurrent layer, W {comparison['window']}",
                 f"{comparison['train_step_ratio']}x train "
                 f"(median {comparison['train_step_ratio_median']}x)"))
  for result in results.get("eval", {}).get("results", []):
    evaluation = result["evaluation"]
    rows.append((f"{result['config']} scoring tokens/s, in process / SavedModel",
                 f"{evaluation['in_process_tokens_per_second']:,.0f} / "
                 f"{evaluation['saved_model_tokens_per_second']:,.0f}"))
  for name, result in results.items():
    if "error" in result:
      rows.append((name, f"failed: {' '.join(result['error'])}"))
  return rows


def summary_table(results):
  rows = summary_rows(results)
  width = max((len(what) for what, _ in rows), default=0)
  return "\n".join(f"{what:{width}}  {figure}" for what, figure in rows)


def run():
  if sys.argv[1:] == ["--version"]:
    import meliad_tf  # pylint: disable=g-import-not-at-top
    print(f"meliad-tf {meliad_tf.__version__}")
    return 0
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
