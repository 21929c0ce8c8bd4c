"""Serving: the exported SavedModel, evaluation of documents and generation."""
