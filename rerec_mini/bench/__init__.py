"""Benchmarks: `python -m rerec_mini.bench {sampler,scorer,train,gpu} [options]`.

Each benchmark lives in its own module and compares against the alternative a user
would otherwise pick, in the same run, as a ratio (these machines are noisy).
Figures are recorded in BENCHMARKS.md, never asserted in tests.
"""
