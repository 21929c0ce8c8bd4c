"""Gin files with Meliad's names; `--gin_search_paths` defaults to this directory."""
