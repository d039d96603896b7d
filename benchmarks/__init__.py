"""Benchmarks run by `sanderling bench NAME`; each measures its reference in the same run."""
