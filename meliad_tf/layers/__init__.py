"""Layers: pure functions of (inputs, state) as tf.Modules; they import nothing above."""
