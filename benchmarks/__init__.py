"""Benchmark suite of cnn-internals: projection, mining, end to end and scaling.

Run it with ``python -m benchmarks.run --device cpu|cuda`` (or
``cnn-internals bench``); see :mod:`benchmarks.run` for the options and
``benchmarks/RESULTS.md`` for measured numbers. Baselines need the ``bench``
extra (``pip install 'cnn-internals[bench]'`` for zennit; Captum is a core
dependency).
"""
