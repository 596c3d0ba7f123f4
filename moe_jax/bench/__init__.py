"""Benchmark harness for the main job (launch/bench.py): policy runs, report, plots."""
