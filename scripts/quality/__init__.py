"""Helpers of ``scripts/bench_quality.py``: tasks, optimizers, the training loop, the result cache, the report.

Imported as the package ``quality`` with ``scripts/`` on ``sys.path`` (as when the script runs), like
``tiny_gpt`` for the other benchmarks.
"""
