"""Tooling over the public API: the command line, the demo, traffic for tests and
benchmarks, and the C schema generator."""
