"""Training: the step, the loop, distribution, per-stream state, checkpoints and summaries."""
