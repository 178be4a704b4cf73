"""Benchmarks by name: ``load_benchmark("synthetic", num_people=50)``.

Each loader takes its own keyword options and returns a :class:`~robustunlearn.data.base.Benchmark`.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Callable

from robustunlearn.data.base import Benchmark
from robustunlearn.data.muse import load_muse
from robustunlearn.data.synthetic import SyntheticConfig, generate_synthetic
from robustunlearn.data.tofu import load_tofu
from robustunlearn.data.wmdp import load_wmdp
from robustunlearn.data.world_facts import load_world_facts


def _synthetic_config(**options: Any) -> SyntheticConfig:
    accepted = [f.name for f in fields(SyntheticConfig)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for benchmark 'synthetic'; accepted: {accepted}")
    return SyntheticConfig(**options)  # its __post_init__ checks the values


def _load_synthetic(**options: Any) -> Benchmark:
    return generate_synthetic(_synthetic_config(**options))


_LOADERS: dict[str, Callable[..., Benchmark]] = {
    "synthetic": _load_synthetic,
    "tofu": load_tofu,
    "muse": load_muse,
    "wmdp": load_wmdp,
    "world-facts": load_world_facts,
}
BENCHMARKS = tuple(_LOADERS)
# Check a loader's options without loading anything: unknown names and bad values are ValueErrors.
_OPTION_CHECKS: dict[str, Callable[..., Any]] = {
    "synthetic": _synthetic_config,
    "tofu": load_tofu.check_options,
    "muse": load_muse.check_options,
    "wmdp": load_wmdp.check_options,
    "world-facts": load_world_facts.check_options,
}


def load_benchmark(name: str, **options: Any) -> Benchmark:
    """Load (or generate) the benchmark called ``name`` with loader-specific ``options``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    return _LOADERS[name](**options)


def check_benchmark_options(name: str, options: dict[str, Any]) -> None:
    """A ValueError naming the first unknown option or bad value that loading benchmark ``name``
    with ``options`` would meet; nothing is read or generated."""
    if name not in _OPTION_CHECKS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    _OPTION_CHECKS[name](**options)
