"""Benchmarks of flash_varlen against its peers (workloads and counting rules: targets.md)."""
