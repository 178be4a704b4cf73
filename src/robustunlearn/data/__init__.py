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


def _load_synthetic(**options: Any) -> Benchmark:
    accepted = [f.name for f in fields(SyntheticConfig)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for benchmark 'synthetic'; accepted: {accepted}")
    return generate_synthetic(SyntheticConfig(**options))


_LOADERS: dict[str, Callable[..., Benchmark]] = {
    "synthetic": _load_synthetic,
    "tofu": load_tofu,
    "muse": load_muse,
    "wmdp": load_wmdp,
}
BENCHMARKS = tuple(_LOADERS)


def load_benchmark(name: str, **options: Any) -> Benchmark:
    """Load (or generate) the benchmark called ``name`` with loader-specific ``options``."""
    if name not in _LOADERS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {list(BENCHMARKS)}")
    return _LOADERS[name](**options)
