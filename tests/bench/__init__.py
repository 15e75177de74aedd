"""Benchmarks: each prints its figures with their goals and a baseline from the same run."""
