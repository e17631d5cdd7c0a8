"""Buckets: runs of consecutive parameters that travel together, each as soon as it is ready.

Backward finishes gradients from the last layer to the first; forward needs parameters
from the first layer to the last. A bucket is a run of whole parameter tensors, so it is one
slice of the flat gradient and parameter buffers (libe_cnn/flat.py) and moves with no copy
to gather it. Buckets are cut from the last parameter backwards, as DDP cuts them: a bucket
closes once it holds at least `cap_bytes` (so a tensor larger than the cap is a bucket alone).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

BYTES_PER_ELEMENT = 4  # the flat buffers are float32, whatever travels on the wire


@dataclass(frozen=True)
class Bucket:
    index: int  # 0 holds the last layers: the order in which backward finishes the buckets
    start: int  # its slice of the flat buffers
    stop: int
    params: tuple[int, ...]  # positions in model.parameters()


def bucket_layout(model: nn.Module, cap_bytes: float) -> list[Bucket]:
    """The model's buckets, in the order backward finishes them (the last layers' first)."""
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    buckets: list[Bucket] = []
    members: list[int] = []
    for i in reversed(range(len(sizes))):
        members.append(i)
        if sum(sizes[j] for j in members) * BYTES_PER_ELEMENT >= cap_bytes or i == 0:
            buckets.append(Bucket(len(buckets), offsets[i], offsets[members[0] + 1], tuple(sorted(members))))
            members = []
    return buckets


def chunk_bounds(bucket: Bucket, n: int) -> list[tuple[int, int]]:
    """The bucket cut into `n` consecutive chunks of nearly equal size, as (start, stop) slices
    of the flat buffers (a chunk is empty when the bucket has fewer than `n` elements)."""
    length = bucket.stop - bucket.start
    return [(bucket.start + c * length // n, bucket.start + (c + 1) * length // n) for c in range(n)]


def forward_order(buckets: list[Bucket]) -> list[Bucket]:
    """The buckets in the order forward needs them (the first layers' first)."""
    return sorted(buckets, key=lambda b: b.start)


def buckets_of_modules(model: nn.Module, buckets: list[Bucket]) -> dict[nn.Module, tuple[int, ...]]:
    """For every module that holds parameters itself, the buckets its forward needs."""
    bucket_of = {id(p): b.index for b in buckets for i, p in enumerate(model.parameters()) if i in b.params}
    needs = {}
    for module in model.modules():
        own = {bucket_of[id(p)] for p in module.parameters(recurse=False)}
        if own:
            needs[module] = tuple(sorted(own))
    return needs
