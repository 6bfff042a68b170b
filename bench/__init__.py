"""KAWHI benchmarks: throughput and memory of the reference forward (see bench/README.md).

Scripts, not timed tests: ``python -m bench.run`` (everything), ``python -m bench.quick``
(one pass on the demo model, under a minute). ``tests/repo/test_bench_smoke.py`` runs the
harness on tiny sizes so it stays runnable.
"""
