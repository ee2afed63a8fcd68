"""Benchmarks: `python -m rerec_mini.bench {sampler,scorer,train,gpu,sanity} [options]`.

Each benchmark lives in its own module and compares against the alternative a user
would otherwise pick, in the same run, as a ratio (these machines are noisy).
Figures are recorded in BENCHMARKS.md, never asserted in tests (the exception, `sanity`, is a
correctness check: tests/test_sanity.py asserts that RL learns its reward and the control does not).
"""
