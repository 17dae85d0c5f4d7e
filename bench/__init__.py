"""Benchmarks, run from the repo root as modules (``python -m bench.quality``); each writes JSON to
bench/results/."""
