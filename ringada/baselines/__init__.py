"""Baselines the benchmarks compare against (not part of the training runtime)."""
