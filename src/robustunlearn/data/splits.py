"""Seeded splits by subject, so the study never scores on what it trained on.

* :func:`retain_views` divides the retain splits, as MUSE does with retain1/retain2, into a
  *regulariser* part (the unlearning loss's retain term may train on it), a *validation* part (the
  learning-rate sweep's utility) and an *evaluation* part (the reported utility: the target was
  trained on it, no unlearning loss sees it).
* :func:`relearn_split` picks the forget records a relearning attack trains on and keeps the ones it
  is scored on apart: other subjects, and other attributes of the relearned subjects.

Records are grouped by ``subject`` (a person, an author), so one person's QA and passages always land
in the same part; a record with an empty subject is a group of its own, named ``#<i>`` after its
index ``i`` (``<split>#<i>`` where several splits are divided together). Groups are sorted, then
shuffled by ``random.Random(seed)``: the same seed gives the same split in every process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from robustunlearn.data.base import QA, Benchmark, Record

PARTS = ("regulariser", "validation", "evaluation")
MUSE_REGULARISER_SET = "retain1"  # the raw retain split MUSE's unlearning baselines train on
SHARE_TOLERANCE = 1e-9


def part_sizes(groups: int, shares: Sequence[float]) -> list[int]:
    """How many of ``groups`` each part gets: largest-remainder rounding of ``share * groups``
    (floors first, then one more to the largest fractional remainders, ties to the earlier part),
    so the sizes sum to ``groups``; a part with a positive share left at 0 then takes one group from
    the largest part (ties to the earlier). 10 groups at .5/.25/.25: quotas 5, 2.5, 2.5 -> 5/3/2."""
    _check_shares(shares)
    positive = sum(share > 0 for share in shares)
    if groups < positive:
        raise ValueError(f"{groups} subject group(s) cannot fill {positive} parts with a positive share")
    quotas = [share * groups for share in shares]
    sizes = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(shares)), key=lambda part: (-(quotas[part] - sizes[part]), part))
    for part in by_remainder[: groups - sum(sizes)]:
        sizes[part] += 1
    for part, share in enumerate(shares):
        if share > 0 and sizes[part] == 0:
            largest = max(range(len(sizes)), key=lambda p: (sizes[p], -p))
            sizes[largest] -= 1
            sizes[part] += 1
    return sizes


def split_by_subject(records: Sequence[Record], shares: Sequence[float], seed: int) -> list[list[Record]]:
    """``records`` divided into ``len(shares)`` parts by subject, sized by :func:`part_sizes` over
    the distinct subjects; each part keeps the records' original order."""
    keys = [_group_key(record, i) for i, record in enumerate(records)]
    part_of = _assign(keys, shares, seed)
    parts: list[list[Record]] = [[] for _ in shares]
    for record, key in zip(records, keys):
        parts[part_of[key]].append(record)
    return parts


@dataclass(frozen=True)
class RetainViews:
    """The benchmark as the unlearning loss (``training``), the learning-rate sweep
    (``validation``) and the reported utility (``evaluation``) see it; ``description`` is
    JSON-serialisable for the study's results."""

    training: Benchmark
    validation: Benchmark
    evaluation: Benchmark
    description: dict[str, Any]


def retain_views(benchmark: Benchmark, seed: int, shares: Sequence[float] = (0.5, 0.25, 0.25)) -> RetainViews:
    """Every ``retain_*`` split divided by ONE subject assignment over the union of their subjects
    (``shares`` = regulariser, validation, evaluation; see :func:`part_sizes`); in each view the
    retain splits hold only that part's records, the forget, holdout and utility splits are the
    benchmark's own.

    MUSE (``muse-*``) prescribes its own layout: the unlearning baselines train on the raw split
    ``retain1``, and utility is KnowMem on ``retain_qa``, questions about ``retain2``. So the
    regulariser is exactly the ``retain1`` passages (whatever ``shares[0]``), and the rest, the
    ``retain_qa`` questions and any ``retain2`` passages, one group per record (their ``subject``
    names the raw split, not a person), is divided between validation and evaluation in the ratio
    ``shares[1] : shares[2]``: no evaluation record and no ``retain2`` text reaches the regulariser.

    WMDP: ``retain_text`` passages carry their subset (``bio``, ``cyber``) as subject, a corpus
    label, so each passage is a group of its own."""
    if len(shares) != len(PARTS) or min(shares) <= 0:
        raise ValueError(f"retain_views needs {len(PARTS)} positive shares {PARTS}, got {list(shares)}")
    names = sorted(name for name in benchmark.splits if name.startswith("retain_"))
    if not names:
        raise ValueError(
            f"benchmark {benchmark.name!r} has no retain split to divide; it has {sorted(benchmark.splits)}"
        )
    muse = benchmark.name.startswith("muse-")
    keys = _muse_keys(benchmark, names) if muse else _retain_keys(benchmark, names)
    if muse:
        held = shares[1] + shares[2]
        part_of = _assign(_all(keys, MUSE_REGULARISER_SET), (0.0, shares[1] / held, shares[2] / held), seed)
        part_of[MUSE_REGULARISER_SET] = 0
    else:
        part_of = _assign(_all(keys), shares, seed)
    views = [
        benchmark.with_splits(
            **{
                name: [r for r, key in zip(benchmark.splits[name], keys[name]) if part_of[key] == part]
                for name in names
            }
        )
        for part in range(len(PARTS))
    ]
    description: dict[str, Any] = {
        "seed": seed,
        "shares": dict(zip(PARTS, shares)),
        "subjects": {
            PARTS[part]: sorted(k for k in set(_all(keys)) if part_of[k] == part) for part in range(len(PARTS))
        },
        "records": {PARTS[part]: {name: len(view.splits[name]) for name in names} for part, view in enumerate(views)},
    }
    if muse:
        description["protocol"] = (
            f"MUSE: the regulariser is the {MUSE_REGULARISER_SET} passages; retain_qa and the other retain "
            "passages are divided per record between validation and evaluation"
        )
    return RetainViews(*views, description)


def _retain_keys(benchmark: Benchmark, names: list[str]) -> dict[str, list[str]]:
    """The group key of each record of each retain split: its subject, or ``<split>#<i>``."""
    by_record = benchmark.name == "wmdp"  # its subject is the subset label, not a person
    return {
        name: [f"{name}#{i}" if by_record else _group_key(r, i, name) for i, r in enumerate(benchmark.splits[name])]
        for name in names
    }


def _muse_keys(benchmark: Benchmark, names: list[str]) -> dict[str, list[str]]:
    """MUSE: every retain1 passage in the one group ``retain1``, every other record its own group."""
    keys = {
        name: [
            MUSE_REGULARISER_SET if name == "retain_text" and r.subject == MUSE_REGULARISER_SET else f"{name}#{i}"
            for i, r in enumerate(benchmark.splits[name])
        ]
        for name in names
    }
    if MUSE_REGULARISER_SET not in keys.get("retain_text", []):
        raise ValueError(
            f"MUSE benchmark {benchmark.name!r} has no {MUSE_REGULARISER_SET} passages in retain_text, the "
            f"regulariser its protocol prescribes; load it with retain_sets including {MUSE_REGULARISER_SET!r}"
        )
    return keys


def _all(keys: dict[str, list[str]], *excluded: str) -> list[str]:
    return [key for split_keys in keys.values() for key in split_keys if key not in excluded]


@dataclass(frozen=True)
class RelearnSplit:
    """What a relearning attack trains on (``train``) and the forget QA it is scored on that it
    never saw: other subjects' (``held_out_subjects``), and the relearned subjects' other attributes
    (``held_out_attributes``). ``description`` is JSON-serialisable."""

    train: tuple[Record, ...]
    held_out_subjects: tuple[QA, ...]
    held_out_attributes: tuple[QA, ...]
    description: dict[str, Any]


def relearn_split(
    benchmark: Benchmark, subjects: int, attribute_share: float, seed: int, text_records: int = 16
) -> RelearnSplit:
    """With ``forget_qa``: ``subjects`` forget subjects are chosen (sorted, then shuffled by
    ``random.Random(seed)``) and, when the QA carry at least two distinct attributes,
    ``round(attribute_share * n)`` of the ``n`` attributes (clamped to 1..n-1, from the same
    generator). ``train`` = the chosen subjects' records on the chosen attributes,
    ``held_out_attributes`` = their records on the others (an empty attribute is never chosen),
    ``held_out_subjects`` = every other subject's records. Without attributes, ``train`` holds all
    the chosen subjects' records.

    Without ``forget_qa`` but with ``forget_text`` (WMDP's forget corpus): ``train`` = ``text_records``
    passages (all, if fewer) drawn by the seed, kept in corpus order; nothing is held out here, since
    the benchmark's forget questions (``forget_mcq``) are not in the text at all."""
    if benchmark.get("forget_qa"):
        return _relearn_qa(benchmark.splits["forget_qa"], subjects, attribute_share, seed)
    if benchmark.get("forget_text"):
        return _relearn_text(benchmark.splits["forget_text"], text_records, seed)
    raise ValueError(
        f"benchmark {benchmark.name!r} has neither forget_qa nor forget_text to relearn on; "
        f"it has {sorted(benchmark.splits)}"
    )


def _relearn_qa(records: list[Record], subjects: int, attribute_share: float, seed: int) -> RelearnSplit:
    keys = [_group_key(record, i) for i, record in enumerate(records)]
    names = sorted(set(keys))
    if not 1 <= subjects < len(names):
        raise ValueError(
            f"relearning subjects must be between 1 and {len(names) - 1} (one forget subject held out), got {subjects}"
        )
    if not 0 < attribute_share < 1:
        raise ValueError(f"attribute_share must be strictly between 0 and 1, got {attribute_share!r}")
    rng = random.Random(seed)
    rng.shuffle(names)
    chosen = set(names[:subjects])
    attributes = sorted({record.attribute for record in records if record.attribute})
    if len(attributes) >= 2:
        rng.shuffle(attributes)
        count = min(max(round(attribute_share * len(attributes)), 1), len(attributes) - 1)
        chosen_attributes = set(attributes[:count])
    else:
        chosen_attributes = set(attributes) | {""}  # nothing to hold out: train on every record
    relearned = [(record, record.attribute in chosen_attributes) for record, key in zip(records, keys) if key in chosen]
    train = tuple(record for record, trained in relearned if trained)
    held_out_subjects = tuple(record for record, key in zip(records, keys) if key not in chosen)
    held_out_attributes = tuple(record for record, trained in relearned if not trained)
    description = {
        "seed": seed,
        "split": "forget_qa",
        "subjects": sorted(chosen),
        "attributes": sorted(chosen_attributes - {""}),
        "counts": _counts(train, held_out_subjects, held_out_attributes),
    }
    return RelearnSplit(train, held_out_subjects, held_out_attributes, description)


def _relearn_text(passages: list[Record], text_records: int, seed: int) -> RelearnSplit:
    if text_records < 1:
        raise ValueError(f"text_records must be at least 1, got {text_records}")
    chosen = sorted(random.Random(seed).sample(range(len(passages)), min(text_records, len(passages))))
    train = tuple(passages[i] for i in chosen)
    description = {
        "seed": seed,
        "split": "forget_text",
        "subjects": [],
        "attributes": [],
        "counts": _counts(train, (), ()),
        "note": "the forget questions (forget_mcq) are not in forget_text: every one is held out from relearning",
    }
    return RelearnSplit(train, (), (), description)


def _counts(train: tuple, held_out_subjects: tuple, held_out_attributes: tuple) -> dict[str, int]:
    return {
        "train": len(train),
        "held_out_subjects": len(held_out_subjects),
        "held_out_attributes": len(held_out_attributes),
    }


def _check_shares(shares: Sequence[float]) -> None:
    if not shares or min(shares) < 0 or abs(sum(shares) - 1) > SHARE_TOLERANCE:
        raise ValueError(f"shares must be non-negative and sum to 1, got {list(shares)}")


def _group_key(record: Record, index: int, split: str = "") -> str:
    return record.subject or f"{split}#{index}"


def _assign(keys: Iterable[str], shares: Sequence[float], seed: int) -> dict[str, int]:
    """Group key -> part index: the distinct keys sorted, shuffled by the seed, cut by
    :func:`part_sizes`."""
    groups = sorted(set(keys))
    sizes = part_sizes(len(groups), shares)
    random.Random(seed).shuffle(groups)
    part_of, start = {}, 0
    for part, size in enumerate(sizes):
        part_of.update((key, part) for key in groups[start : start + size])
        start += size
    return part_of
