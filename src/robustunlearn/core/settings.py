"""The base of every settings model: strict (unknown keys are errors, numbers are finite), frozen,
and with names checked against a registry so an error lists the accepted values."""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def check_name(kind: str, value: str, accepted: Iterable[str]) -> str:
    """``value`` if it is one of ``accepted``, else a ValueError naming them all."""
    accepted = list(accepted)
    if value not in accepted:
        raise ValueError(f"unknown {kind} {value!r}; accepted: {', '.join(sorted(accepted))}")
    return value
