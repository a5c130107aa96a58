"""Throughput benchmark suite: every stage measured beside its baseline in the same run (see docs/benchmarks.md)."""
