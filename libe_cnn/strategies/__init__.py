"""The registry of aggregation strategies (--strategy), in the order --help and the README list them.

To add one: write a module here that defines STRATEGY (see base.py: a Strategy with its own
loops, or a Periodic with the round hooks), and add it below.
"""

from __future__ import annotations

from libe_cnn.strategies import async_, easgd, gossip, local, param_avg, sync, weighted_param_avg
from libe_cnn.strategies.base import Option, Strategy

REGISTRY: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in
                                 (sync, async_, param_avg, weighted_param_avg, easgd, gossip, local)}
STRATEGIES = tuple(REGISTRY)
DEFAULT = sync.STRATEGY.name


def strategy(name: str) -> Strategy:
    return REGISTRY[name]


def all_options() -> dict[str, Option]:
    """Every strategy option by its TrainConfig field, each once."""
    return {o.name: o for s in REGISTRY.values() for o in s.options}


def skipping_nonfinite() -> list[str]:
    """The strategies that can leave a non-finite contribution out (--on-nonfinite skip)."""
    return [name for name, s in REGISTRY.items() if s.skips_nonfinite]


def takers(option: Option) -> list[str]:
    """The strategies that take `option`."""
    return [name for name, s in REGISTRY.items() if option in s.options]
