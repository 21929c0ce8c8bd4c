"""Parsing gin files the way Meliad's launcher does, with our configs on the search path."""

import contextlib
import logging
import os
import tokenize

import gin
import tensorflow as tf

import meliad_configs
# pylint: disable=unused-import  # Importing registers their gin configurables.
import pipelines
from meliad_tf.layers import memory
from meliad_tf.layers import mlp
from meliad_tf.layers import norms
from meliad_tf.model import decoder
from meliad_tf.model import language_model
from meliad_tf.model import layer
from meliad_tf.model import task_config
from meliad_tf.training import optimizer
from meliad_tf.training import schedules
from meliad_tf.training import trainer


# pylint: enable=unused-import

CONFIG_DIRECTORY = os.path.dirname(os.path.abspath(meliad_configs.__file__))

# Gin opens files with `open`; through tf.io.gfile, gin files, their includes and search
# paths may also be in a bucket (gs://...).
gin.config.register_file_reader(
    tf.io.gfile.GFile, lambda path: tf.io.gfile.exists(path) and not tf.io.gfile.isdir(path))


def parse(gin_files, gin_params=(), search_paths=()):
  """Parses files (in order, later bindings win) then parameters.

  Relative file names are looked up in `search_paths`, then in the shipped configs
  directory. Unknown configurables, parameters or files raise gin's error naming them.
  """
  for path in list(search_paths) + [CONFIG_DIRECTORY]:
    gin.add_config_file_search_path(path)
  # Gin probes Python packages for each relative name before the search path and logs a
  # misleading "Path not found" error for every miss; real failures raise anyway.
  previous = logging.root.manager.disable
  logging.disable(logging.ERROR)
  try:
    # One source at a time, so that a syntax error names its file or binding.
    for gin_file in gin_files:
      with _naming_syntax_errors(f"gin file {gin_file}"):
        try:
          gin.parse_config_file(gin_file)
        except RecursionError:
          raise ValueError(f"gin file {gin_file} includes itself, directly or through the "
                           "files it includes (an include cycle)") from None
    for binding in gin_params:
      with _naming_syntax_errors(f"--gin_param {binding!r}"):
        gin.parse_config(binding)
  finally:
    logging.disable(previous)


@contextlib.contextmanager
def _naming_syntax_errors(source):
  """Turns gin's syntax errors (which name a line but not the source) into ValueErrors."""
  try:
    yield
  except (SyntaxError, tokenize.TokenError) as e:
    detail = e.msg if isinstance(e, SyntaxError) else e.args[0]
    line = e.lineno if isinstance(e, SyntaxError) else e.args[1][0]
    raise ValueError(f"gin syntax error in {source}, line {line}: {detail}") from e
