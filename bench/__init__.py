"""msgd's benchmarks: `python -m bench` (see docs/performance.md).

Not tests: nothing here asserts a time. tests/bench/ runs `python -m bench --quick` so that
the benchmark cannot rot.
"""
