"""The model: transformer layers, the decoder stack and the language model, built from layers."""
