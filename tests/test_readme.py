"""The README's commands stay true: they paste into a shell as written, name programs, flags,
gin files, make targets and extras that exist, and the cheap ones run.

Commands are the README's `sh` blocks and the inline code spans that start with one of our
programs and carry a flag. A program accepts every absl flag registered once its module is
imported, so the flags of each program are read in a process of its own, forked from one that
has imported TensorFlow and the library once.
"""

import json
import os
import re
import subprocess
import sys

import pytest
from absl.testing import flagsaver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
# Characters a shell acts on when they stand unquoted in a word: globs, command separators,
# pipes and subshells. Redirections (`>`) are allowed.
_UNSAFE = set("*?[;&|()")
# Programs other than ours that the README runs.
_OTHER_PROGRAMS = {"make", "pip", "tfds", "export", "python", "tensorboard"}
# Gin files the README has the user write.
_USERS_GIN_FILES = {"my_books.gin"}


def _programs():
  """{console script: its module}, from setup.py's entry points."""
  with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
    return dict(re.findall(r'"(meliad-[a-z]+)=meliad_tools\.([a-z_]+):run"', f.read()))


PROGRAMS = _programs()


def split_commands(text):
  """Shell text -> commands, each a list of (word, unquoted special characters in it).

  Follows the shell's quoting: single and double quotes, backslash escapes, backslash-newline
  continuations, `#` comments at the start of a word, and unquoted newlines between commands.
  """
  commands, words = [], []
  word, unsafe, in_word = "", set(), False
  quote = None
  i = 0

  def end_word():
    nonlocal word, unsafe, in_word
    if in_word:
      words.append((word, unsafe))
    word, unsafe, in_word = "", set(), False

  while i < len(text):
    char = text[i]
    if quote:
      if char == quote:
        quote = None
      elif char == "\\" and quote == '"' and i + 1 < len(text):
        i += 1
        word += text[i]
      else:
        word += char
    elif char in "'\"":
      quote, in_word = char, True
    elif char == "\\" and i + 1 < len(text):
      i += 1
      if text[i] != "\n":
        word += text[i]
        in_word = True
    elif char == "#" and not in_word:
      while i < len(text) and text[i] != "\n":
        i += 1
      continue
    elif char in " \t":
      end_word()
    elif char == "\n":
      end_word()
      if words:
        commands.append(words)
      words = []
    else:
      word += char
      in_word = True
      if char in _UNSAFE:
        unsafe.add(char)
    i += 1
  assert quote is None, f"unclosed {quote} in {text!r}"
  end_word()
  if words:
    commands.append(words)
  return commands


def readme_commands():
  """(line number, command text) of every sh block line group and of the inline commands."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  found = []
  for match in re.finditer(r"^```sh\n(.*?)^```", text, re.MULTILINE | re.DOTALL):
    line = text[:match.start()].count("\n") + 2
    found.append((line, match.group(1)))
  prose = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), text,
                 flags=re.MULTILINE | re.DOTALL)
  for match in re.finditer(r"`(meliad-[a-z]+ [^`]*--[^`]*)`", prose):
    # Markdown reads a line break inside a code span as a space.
    found.append((prose[:match.start()].count("\n") + 1, match.group(1).replace("\n", " ")))
  return found


COMMANDS = [(line, [w for w, _ in words], words) for line, block in readme_commands()
            for words in split_commands(block)]


def _program_of(words):
  """The program a command runs and the words after it (leading VAR=value assignments off)."""
  index = 0
  while index < len(words) and re.match(r"^[A-Z_]+=", words[index]):
    index += 1
  return (words[index], words[index + 1:]) if index < len(words) else (None, [])


def test_the_splitter_follows_shell_quoting():
  commands = split_commands(
      "a --x='files:/b/*.txt' \\\n  --y=\"k = 1; j\"  # note\n"
      "b --z=*.txt --w=c;d 'multi\nline'\n")
  assert [[w for w, _ in c] for c in commands] == [
      ["a", "--x=files:/b/*.txt", "--y=k = 1; j"], ["b", "--z=*.txt", "--w=c;d", "multi\nline"]]
  assert [sorted(u for _, unsafe in c for u in unsafe) for c in commands] == [[], ["*", ";"]]


def test_the_readme_has_commands_to_check():
  programs = {_program_of(words)[0] for _, words, _ in COMMANDS}
  assert {"meliad-train", "meliad-eval", "meliad-plot", "make"} <= programs, programs


@pytest.mark.parametrize("line, words, parsed", COMMANDS, ids=[str(c[0]) for c in COMMANDS])
def test_commands_paste_into_a_shell_as_written(line, words, parsed):
  for word, unsafe in parsed:
    assert not unsafe, (f"README.md:{line}: quote {word!r}: a shell reads "
                        f"{''.join(sorted(unsafe))} in it")
  program, _ = _program_of(words)
  assert program in PROGRAMS or program in _OTHER_PROGRAMS, f"README.md:{line}: {program}?"


def _flags_of_programs():
  """{program (`meliad-bench train` for a benchmark): names of the flags it accepts}."""
  modules = {program: [module] for program, module in PROGRAMS.items()}
  for _, words, _ in COMMANDS:
    program, rest = _program_of(words)
    if program == "meliad-bench" and rest and not rest[0].startswith("-"):
      modules[f"meliad-bench {rest[0]}"] = ["bench", f"bench_{rest[0]}"]
  script = f"""
import importlib, json, os, sys
import tensorflow, pipelines
from absl import flags
from meliad_tf.serving import evaluation, export, generation
from meliad_tf.training import trainer
result = {{}}
for program, names in {json.dumps(modules)}.items():
  read, write = os.pipe()
  if os.fork() == 0:
    os.close(read)
    for name in names:
      importlib.import_module("meliad_tools." + name)
    os.write(write, json.dumps(sorted(flags.FLAGS)).encode())
    os._exit(0)
  os.close(write)
  with os.fdopen(read) as pipe:
    result[program] = json.loads(pipe.read() or "[]")
  os.wait()
print(json.dumps(result))
"""
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  output = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True, env=environment, cwd=ROOT).stdout
  return {program: set(names) for program, names in json.loads(output).items()}


@pytest.fixture(scope="module")
def program_flags():
  return _flags_of_programs()


def _gin_files():
  configs = os.path.join(ROOT, "configs")
  return {os.path.relpath(os.path.join(d, n), configs)
          for d, _, names in os.walk(configs) for n in names if n.endswith(".gin")}


def test_flags_gin_files_targets_and_extras_exist(program_flags):
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  gin_files = _gin_files()
  with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
    targets = set(re.findall(r"^([a-z][a-z-]*):", f.read(), re.MULTILINE))
  extras = set(importlib.metadata.metadata("meliad-tf").get_all("Provides-Extra"))
  assert any(program_flags.values())
  for line, words, _ in COMMANDS:
    program, rest = _program_of(words)
    if program == "make":
      for target in (w for w in rest if "=" not in w):
        assert target in targets, f"README.md:{line}: make {target}"
    if program == "pip":
      for extra in re.findall(r"\[([a-z,]+)\]", " ".join(rest)):
        assert set(extra.split(",")) <= extras, f"README.md:{line}: extra [{extra}]"
    if program not in PROGRAMS:
      continue
    if program == "meliad-bench" and rest and not rest[0].startswith("-"):
      program = f"meliad-bench {rest[0]}"
    known = program_flags[program]
    for word in rest:
      if not word.startswith("--"):
        continue
      name, _, value = word[2:].partition("=")
      assert name in known or (name.startswith("no") and name[2:] in known), (
          f"README.md:{line}: {program} has no flag --{name}")
      if name == "gin_file" and not value.startswith("runs/") and value not in _USERS_GIN_FILES:
        assert value in gin_files, f"README.md:{line}: no configs/{value}"


def test_the_readmes_meliad_data_command_runs_with_tiny_settings(tmp_path, capsys, clean_gin):
  from meliad_tools import data as data_tool  # pylint: disable=g-import-not-at-top
  (line, words, _), = [c for c in COMMANDS if _program_of(c[1])[0] == "meliad-data"
                       and any(w.startswith("--dump=") for w in c[1])]
  settings = {}
  for word in _program_of(words)[1]:
    name, _, value = word[2:].partition("=")
    settings[name] = value
  assert settings.pop("num_batches") and settings.pop("dump"), f"README.md:{line}"
  dump = tmp_path / "batches.jsonl"
  with flagsaver.flagsaver(source=settings.pop("source"), batch_size=int(settings.pop("batch_size")),
                           sequence_length=int(settings.pop("sequence_length")),
                           num_batches=2, dump=str(dump), print_batches=0):
    assert not settings, f"README.md:{line}: flags left untried: {settings}"
    data_tool.main(["meliad-data"])
  capsys.readouterr()
  batches = [json.loads(l) for l in dump.read_text().splitlines()]
  assert len(batches) == 2 and len(batches[0]["targets"]) == 4


def _scalar_table():
  """{mode: names} from the README's table of TensorBoard scalars (rows of plain names)."""
  with open(README, encoding="utf-8") as f:
    text = f.read()
  table = text[text.index("<!-- scalars -->"):].split("\n\n")[0]
  listed = {"train": set(), "test": set()}
  for row in table.splitlines()[3:]:
    names_cell, where = row.strip("|").split("|")
    if "diagnostics/" in names_cell:  # a layer's, which a Transformer-XL run does not write
      continue
    for mode in re.findall(r"`(train|test)/`", where):
      listed[mode] |= set(re.findall(r"`([a-z_]+)`", names_cell))
  return listed


def test_the_readmes_scalars_are_those_a_run_writes(tmp_path):
  import tiny_run  # pylint: disable=g-import-not-at-top
  from meliad_tf.training import plots  # pylint: disable=g-import-not-at-top
  tiny_run.train(tmp_path, "Trainer.log_every_steps = 1", "Trainer.test_every_steps = 1",
                 "Trainer.num_test_steps = 1", "Trainer.skip_nonfinite_steps = True")
  written = {"train": set(), "test": set()}
  tags = plots.read_scalars(str(tmp_path))
  for tag in tags:
    mode, _, name = tag.partition("/")
    if mode in written:
      written[mode].add(name)
  assert written == _scalar_table()
  assert any(tag.startswith("params/") and tag.endswith("/std") for tag in tags)
