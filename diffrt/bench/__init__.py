"""Latency benchmarks: `diffrt bench` (see docs/benchmarks.md). Submodules import heavy libraries lazily."""
