"""WMDP (Li et al., 2024, "The WMDP Benchmark: Measuring and Reducing Malicious Use With
Unlearning") as a :class:`~robustunlearn.data.base.Benchmark`: the multiple-choice questions of the
chosen subsets (``bio``, ``cyber``, ``chem``) and the forget and retain corpora used to unlearn them.

Local directory (``.json`` = JSON array or JSON Lines, ``.jsonl`` = JSON Lines):

* ``wmdp-<subset>.json`` or ``.jsonl``: rows ``{"question": str, "choices": [str, ...],
  "answer": int}`` (0-based index into ``choices``) -> ``forget_mcq``, ``subject`` = subset;
* ``<subset>-forget-corpus.jsonl`` -> ``forget_text``, ``<subset>-retain-corpus.jsonl`` ->
  ``retain_text`` (in ``data_dir`` or its ``wmdp-corpora/`` folder, as the authors' zip unpacks),
  for ``bio`` and ``cyber`` (WMDP publishes no chem corpora). A line is ``{"text": str}``, a JSON
  string, or plain text (the mirrored cyber and retain files hold raw lines); a line starting with
  ``{`` must be valid JSON.

Hub: questions from ``cais/wmdp`` (config ``wmdp-<subset>``, split ``test``); corpora from
``cais/wmdp-corpora`` (configs ``cyber-forget-corpus``, ``bio-retain-corpus``,
``cyber-retain-corpus``, split ``train``) and the gated ``cais/wmdp-bio-forget-corpus``.

Corpus documents are cut into passages of at most ``chunk_chars`` characters
(:func:`robustunlearn.data.muse.chunk_text`); ``subject`` is the subset. MMLU, WMDP's utility
measure, is not loaded here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from robustunlearn.core.errors import UserError
from robustunlearn.data.base import Benchmark, MultipleChoice, Passage
from robustunlearn.data.muse import (
    DEFAULT_CHUNK_CHARS,
    chunk_text,
    validate_chunk_chars,
)
from robustunlearn.data.tofu import (
    Table,
    check_directory,
    check_names_option,
    check_path_option,
    checked_options,
    find_file,
    hub_table,
    read_table,
)

SCHEMA_VERSION = "1"
MCQ_HUB_NAME = "cais/wmdp"
CORPORA_HUB_NAME = "cais/wmdp-corpora"
BIO_FORGET_HUB_NAME = "cais/wmdp-bio-forget-corpus"  # gated: request access from the WMDP authors
SUBSETS = ("bio", "cyber", "chem")
CORPUS_SUBSETS = ("bio", "cyber")


def _check_wmdp_values(options: dict[str, Any]) -> None:
    check_path_option(options, "data_dir")
    check_names_option(options, "subsets", SUBSETS)
    if not isinstance(options.get("corpora", True), bool):
        raise ValueError(f"corpora must be true or false, got {options['corpora']!r}")
    validate_chunk_chars(options.get("chunk_chars"))
    max_documents = options.get("max_documents")
    if max_documents is not None and (
        isinstance(max_documents, bool) or not isinstance(max_documents, int) or max_documents < 1
    ):
        raise ValueError(f"max_documents must be a positive integer or None (all), got {max_documents!r}")


@checked_options("wmdp", _check_wmdp_values)
def load_wmdp(
    data_dir: str | Path | None = None,
    *,
    subsets: Sequence[str] = ("bio", "cyber"),
    corpora: bool = True,
    chunk_chars: int | None = DEFAULT_CHUNK_CHARS,
    max_documents: int | None = None,
) -> Benchmark:
    """Load the WMDP ``subsets`` from ``data_dir``, or from the hub when ``data_dir`` is None.

    ``corpora=False`` loads the questions only (the bio forget corpus is gated). ``max_documents``
    reads at most that many documents per corpus (the bio retain corpus has 60,887 papers)."""
    subsets = (subsets,) if isinstance(subsets, str) else tuple(subsets)
    root = check_directory(data_dir, "WMDP") if data_dir is not None else None

    tables: list[Table] = []
    splits: dict[str, list] = {"forget_mcq": [], "forget_text": [], "retain_text": []}
    for subset in subsets:
        table = _mcq_table(root, subset)
        tables.append(table)
        splits["forget_mcq"] += [_multiple_choice(table, where, row, subset) for where, row in table.rows]
        if not corpora or subset not in CORPUS_SUBSETS:
            continue
        for role in ("forget", "retain"):
            table = _corpus_table(root, subset, role, max_documents)
            tables.append(table)
            splits[f"{role}_text"] += [
                Passage(chunk, subset)
                for where, row in table.rows
                for chunk in chunk_text(table.text(where, row), chunk_chars)
            ]
    metadata = {
        "source": str(root) if root is not None else f"hub:{MCQ_HUB_NAME}",
        "subsets": list(subsets),
        "corpora": corpora,
        "chunk_chars": chunk_chars,
        "max_documents": max_documents,
        "tables": [t.source for t in tables],
    }
    return Benchmark("wmdp", SCHEMA_VERSION, {k: v for k, v in splits.items() if v}, metadata)


def _mcq_table(root: Path | None, subset: str) -> Table:
    if root is None:
        return hub_table(MCQ_HUB_NAME, f"wmdp-{subset}", "test")
    path = find_file(root, f"wmdp-{subset}")
    if path is None:
        raise UserError(f"WMDP data is missing {root / f'wmdp-{subset}.json'} (or .jsonl), the {subset} questions")
    return read_table(path)


def _corpus_table(root: Path | None, subset: str, role: str, max_documents: int | None) -> Table:
    name = f"{subset}-{role}-corpus"
    if root is None:
        if name == "bio-forget-corpus":
            return hub_table(BIO_FORGET_HUB_NAME, None, "train", limit=max_documents)
        return hub_table(CORPORA_HUB_NAME, name, "train", limit=max_documents)
    for directory in (root, root / "wmdp-corpora"):
        path = find_file(directory, name, (".jsonl", ".json"))
        if path is not None:
            return read_table(path, plain_lines=True, limit=max_documents)
    gated = " (it is gated: request it from the WMDP authors)" if name == "bio-forget-corpus" else ""
    raise UserError(f"WMDP data is missing {root / name}.jsonl{gated}; pass corpora=False to load the questions only")


def _multiple_choice(table: Table, where: str, row: Any, subset: str) -> MultipleChoice:
    question = table.string(where, row, "question")
    choices = table.strings(where, row, "choices")
    if len(choices) < 2:
        raise table.error(where, f"field 'choices' needs at least two options, got {len(choices)}")
    if "answer" not in row:
        raise table.error(where, "missing field 'answer'")
    answer = row["answer"]
    if isinstance(answer, bool) or not isinstance(answer, int):
        raise table.error(where, f"field 'answer' must be an integer index into 'choices', got {answer!r}")
    if not 0 <= answer < len(choices):
        raise table.error(
            where,
            f"field 'answer' is {answer}, out of range for {len(choices)} choices (expected 0 to {len(choices) - 1})",
        )
    return MultipleChoice(question, choices, answer, subset)
