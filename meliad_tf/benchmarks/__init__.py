"""Benchmarks: step timing and the profiler's attribution of a step's time to model parts."""
