"""tandem's benchmarks: speed, memory and recall, measured apart from the tests.

Each module runs alone (``python -m benchmarks.index_bench``) and writes JSON and a PNG plot
to ``benchmarks/results/``. ``python -m benchmarks`` runs them all.
"""
