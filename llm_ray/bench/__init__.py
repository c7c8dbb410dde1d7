"""Benchmarks: same-run ratios of the engine against a named baseline (not tests: nothing asserts a speed)."""
