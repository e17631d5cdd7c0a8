"""Shared plumbing of the trainer: config, the tensor store and codec, the private Redis
server, the run directory and metrics, and per-process compute placement."""
