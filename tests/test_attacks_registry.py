"""The attack registry: which names parse, what a bad one says, and the config's use of it."""

from __future__ import annotations

import pytest

from robustunlearn.attacks import (
    ATTACK_SPECS,
    FAMILIES,
    QUANTIZATION_METHODS,
    AttackOutcome,
    AttackSpec,
    accepted_attacks,
    parse_attack,
    parse_method,
)
from robustunlearn.config import load_settings
from robustunlearn.core.errors import UserError

DOCUMENTED = {  # name -> (family, parsed strength)
    **{name: ("quantization", parse_method(name)) for name in ("rtn-int2", "rtn-int8", "gptq-int3", "hqq-int1")},
    "relearn": ("relearning", None),
    "relearn-lora": ("relearning", None),
    "benign-relearn": ("relearning", None),
    "noise-0": ("perturbation", 0.0),
    "noise-0.01": ("perturbation", 0.01),
    "noise-1e-3": ("perturbation", 0.001),
    "noise-2": ("perturbation", 2.0),
    "prune-0": ("perturbation", 0.0),
    "prune-0.5": ("perturbation", 0.5),
    "prune-0.999": ("perturbation", 0.999),
}


@pytest.mark.parametrize("name", DOCUMENTED)
def test_parse_attack_accepts_the_documented_forms(name):
    attack = parse_attack(name)
    assert (attack.name, attack.family, attack.strength) == (name, *DOCUMENTED[name])


def test_every_quantization_method_is_an_attack():
    for name in QUANTIZATION_METHODS:
        attack = parse_attack(name)
        assert attack.family == "quantization"
        assert attack.strength in (None, parse_method(name))


@pytest.mark.parametrize(
    "name, reason",
    [
        ("prune-2", "needs 0 <= sparsity < 1"),
        ("prune-1.0", "needs 0 <= sparsity < 1"),
        ("prune-", "needs 0 <= sparsity < 1"),
        ("noise--1", "needs scale >= 0"),
        ("noise-abc", "needs scale >= 0"),
        ("noise-nan", "needs scale >= 0"),
        ("rtn-int9", "needs 2 <= bits <= 8"),
        ("quanto-int3", "needs bits in {2,4,8}"),
        ("int4", "unknown attack"),  # quantize_model's aliases are not attack names
        ("relearn-adapters", "unknown attack"),
        ("Relearn", "unknown attack"),
    ],
)
def test_parse_attack_rejects_bad_names_with_the_accepted_forms(name, reason):
    with pytest.raises(ValueError) as error:
        parse_attack(name)
    message = str(error.value)
    assert "\n" not in message and repr(name) in message and reason in message
    assert message.endswith(f"accepted: {accepted_attacks()}")
    for form in ("rtn-int<bits>", "nf4", "relearn-lora", "benign-relearn", "noise-<scale>", "prune-<sparsity>"):
        assert form in message


def test_each_name_belongs_to_one_spec():
    for spec in ATTACK_SPECS:
        name = spec.name if spec.strength is None else spec.name + "1"
        assert [other for other in ATTACK_SPECS if other.matches(name)] == [spec], name
    assert {spec.family for spec in ATTACK_SPECS} == set(FAMILIES)


def test_a_spec_needs_a_known_family():
    with pytest.raises(ValueError, match="family"):
        AttackSpec(
            "erase", "erasure", "a made-up attack", lambda model, strength, context: AttackOutcome(model, None, {})
        )


@pytest.mark.parametrize("attack", ["prune-2", "noise-x", "rtn-int9"])
def test_a_bad_attack_fails_config_validation(tmp_path, attack):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"study: {{attacks: [rtn-int4, {attack}]}}\n")
    with pytest.raises(UserError, match=rf"study\.attacks.*{attack}"):
        load_settings(recipe)
    with pytest.raises(UserError, match=rf"study\.attacks.*{attack}"):
        load_settings(None, {"study": {"attacks": [attack]}})
    assert load_settings(None, {"study": {"attacks": ["noise-0.01", "prune-0.5"]}}).study.attacks == (
        "noise-0.01",
        "prune-0.5",
    )
