"""Benchmarks: this tool against one process and torch DDP, measured side by side."""
