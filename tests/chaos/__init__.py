"""The chaos suite of issue 28 ("one bad session hurts no one"): faults injected into real processes
(``atlas serve``, redis-server) while requests run, every answer counted (tests/chaos/table.py).

The tests marked ``slow`` are the full version (``python -m tests.chaos`` runs them and saves the
table to bench/results/chaos-cpu.json); the others, a few faults of each class, run in the normal
suite. docs/chaos.md has the table and its legend.
"""
