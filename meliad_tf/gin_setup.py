"""Parsing gin files the way Meliad's launcher does, with our configs on the search path."""

import logging
import os

import gin

import meliad_configs
import meliad_tf  # pylint: disable=unused-import  # Registers the configurables.
import pipelines  # pylint: disable=unused-import

CONFIG_DIRECTORY = os.path.dirname(os.path.abspath(meliad_configs.__file__))


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
    gin.parse_config_files_and_bindings(list(gin_files), list(gin_params),
                                        finalize_config=False)
  finally:
    logging.disable(previous)
