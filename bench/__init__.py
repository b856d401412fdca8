"""Benchmarks: numbers printed and written as JSON, never asserted as timings."""
