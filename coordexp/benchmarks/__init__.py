"""Benchmarks as library code: `coordexp-client bench` and the scripts in bench/ are thin adapters."""
