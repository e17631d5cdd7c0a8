"""The registry of aggregation strategies (--strategy), in the order --help and the README list them.

To add one: write a module here that defines STRATEGY (see base.py: a Strategy with its own
loops, or a Periodic with the round hooks), and add it below.
"""

from __future__ import annotations

from libe_cnn.strategies import (
    async_,
    diloco,
    easgd,
    elastic_gossip,
    gossip,
    local,
    param_avg,
    ring_allreduce,
    sync,
    weighted_param_avg,
)
from libe_cnn.strategies.base import Option, Strategy

REGISTRY: dict[str, Strategy] = {m.STRATEGY.name: m.STRATEGY for m in
                                 (sync, ring_allreduce, async_, param_avg, weighted_param_avg, easgd, gossip,
                                  elastic_gossip, diloco, local)}
STRATEGIES = tuple(REGISTRY)
DEFAULT = sync.STRATEGY.name


def strategy(name: str) -> Strategy:
    return REGISTRY[name]


def all_options() -> dict[str, Option]:
    """Every strategy option by its TrainConfig field, each once: the first strategy's version.

    Versions of one field share its flag and parsing (type, choices, metavar); each strategy's
    own check and default are `Strategy.option(name)`'s.
    """
    options: dict[str, Option] = {}
    for s in REGISTRY.values():
        for o in s.options:
            options.setdefault(o.name, o)
    return options


def option_versions(option: Option) -> dict[Option, list[str]]:
    """The versions of `option`'s field, each with the strategies that take it, in registry order."""
    versions: dict[Option, list[str]] = {}
    for name, s in REGISTRY.items():
        own = s.option(option.name)
        if own is not None:
            versions.setdefault(own, []).append(name)
    return versions


def option_help(option: Option) -> str:
    """--help's text for the option's field: each version's help and default, after its strategies."""
    return "; ".join(f"{', '.join(names)}: {o.help} (default: {o.default_text or o.default})"
                     for o, names in option_versions(option).items())


def skipping_nonfinite() -> list[str]:
    """The strategies that can leave a non-finite contribution out (--on-nonfinite skip)."""
    return [name for name, s in REGISTRY.items() if s.skips_nonfinite]


def int8_strategies() -> list[str]:
    """The strategies that take --wire-dtype int8."""
    return [name for name, s in REGISTRY.items() if s.int8_wire]


def takers(option: Option) -> list[str]:
    """The strategies that take `option`'s field (in any version)."""
    return [name for name, s in REGISTRY.items() if s.option(option.name) is not None]


def option_warnings(cfg) -> list[str]:
    """Warnings for the chosen strategy's option values that are allowed but rarely meant."""
    chosen = strategy(cfg.strategy)
    return [warning for option in chosen.options if option.warn
            for warning in [option.warn(getattr(cfg, option.name), cfg.n_workers)] if warning]
