"""The attack registry: every attack the study can run, collected from the attack modules' ``SPECS``
(:mod:`robustunlearn.attacks.spec` says what a spec is and how to add one).

    attack = parse_attack("noise-0.01")  # ValueError, listing the accepted forms, on a bad name
    attacked, curve, config = attack.run(model, context)
"""

from __future__ import annotations

from robustunlearn.attacks import noise, relearn
from robustunlearn.attacks.quant import quantize
from robustunlearn.attacks.spec import AttackSpec, ParsedAttack

ATTACK_SPECS: tuple[AttackSpec, ...] = (*quantize.SPECS, *relearn.SPECS, *noise.SPECS)


def accepted_attacks() -> str:
    """The accepted forms with their strengths' rules: ``..., noise-<scale> (scale >= 0), ...``."""
    return ", ".join(spec.usage for spec in ATTACK_SPECS)


def describe_attacks() -> str:
    """``form (rule): description`` of every attack, for help texts."""
    return "; ".join(f"{spec.usage}: {spec.description}" for spec in ATTACK_SPECS)


def parse_attack(name: str) -> ParsedAttack:
    """The attack ``name`` with its strength parsed; a one-line ValueError listing the accepted
    forms if no spec has that name or its strength breaks the spec's rule."""
    spec = next((spec for spec in ATTACK_SPECS if spec.matches(name)), None)
    if spec is None:
        raise ValueError(f"unknown attack {name!r}; accepted: {accepted_attacks()}")
    if spec.strength is None:
        return ParsedAttack(name, spec, None)
    try:
        strength = spec.strength.parse(name.removeprefix(spec.name))
    except ValueError:
        raise ValueError(
            f"invalid attack {name!r}: {spec.form} needs {spec.strength.rule}; accepted: {accepted_attacks()}"
        ) from None
    return ParsedAttack(name, spec, strength)
