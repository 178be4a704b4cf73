"""MUSE (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for Language Models") News
and Books as a :class:`~robustunlearn.data.base.Benchmark`, from a local directory laid out like the
MUSE repository's ``data/news`` or ``data/books``, or from the hub datasets ``muse-bench/MUSE-News``
and ``muse-bench/MUSE-Books``.

Both name the same tables ``<config>/<split>``; locally each is the file
``<data_dir>/<config>/<split>`` with extension ``.txt`` (raw only: the whole file is one
document), ``.json`` (a JSON array, or JSON Lines) or ``.jsonl``:

* ``raw/forget`` (text) -> ``forget_text`` (required);
* ``raw/retain1``, ``raw/retain2`` (text) -> ``retain_text``, those named in ``retain_sets``
  (required);
* ``raw/holdout`` (text) -> ``holdout_text``;
* ``verbmem/forget`` (prompt, gt) -> ``forget_verbmem`` (``Continuation(prompt, gt)``);
* ``knowmem/forget_qa``, ``knowmem/retain_qa`` (question, answer) -> ``forget_qa``, ``retain_qa``;
* ``knowmem/forget_qa_icl``, ``knowmem/retain_qa_icl`` (question, answer) -> ``metadata["few_shot"]``;
* ``privleak/forget``, ``privleak/retain``, ``privleak/holdout`` (text) -> ``metadata["privleak"]``.

Some mirrors ship the repository's older layout, which names ``knowmem/retain_qa``,
``knowmem/retain_qa_icl`` and ``privleak/retain`` as ``knowmem/retain2_qa``,
``knowmem/retain2_qa_icl`` and ``privleak/retain2`` (the raw splits keep their names): a local
directory with those names is read with a one-line warning saying so; one mixing both is refused.

A text row is a string (the repository's JSON arrays) or an object with ``text`` (the hub). The
real files hold a few empty ones (an empty article): they are skipped with one warning counting
them, while a malformed row (no ``text``, not a string) and a raw table with no text at all are
refused. Raw documents (whole news articles, whole books) are cut into passages of at most
``chunk_chars`` characters by :func:`chunk_text`, since training truncates each passage to
``max_length`` tokens; each passage's ``subject`` is its raw split (``forget``, ``retain1``, ...).
Locally the tables not marked required may be absent; from the hub every table is loaded.

The few-shot examples and PrivLeak's exact MIA texts are evaluation inputs with no
``{role}_{kind}`` split of their own: :func:`few_shot_examples` and :func:`privleak_sets` read them
back as records.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from robustunlearn.core.errors import UserError
from robustunlearn.data.base import QA, Benchmark, Continuation, Passage
from robustunlearn.data.tofu import (
    Table,
    check_directory,
    check_names_option,
    check_path_option,
    check_string_option,
    checked_options,
    find_file,
    hub_table,
    read_table,
)

SCHEMA_VERSION = "1"
HUB_NAMES = {"news": "muse-bench/MUSE-News", "books": "muse-bench/MUSE-Books"}
RETAIN_SETS = ("retain1", "retain2")
FEW_SHOT_SPLITS = ("forget_qa", "retain_qa")
PRIVLEAK_SPLITS = ("forget", "retain", "holdout")
DEFAULT_CHUNK_CHARS = 2000  # about 500 Llama tokens; MUSE itself trains on 2048-token windows
# (config, current name) -> the older layout's name of the same table.
OLDER_NAMES = {
    ("knowmem", "retain_qa"): "retain2_qa",
    ("knowmem", "retain_qa_icl"): "retain2_qa_icl",
    ("privleak", "retain"): "retain2",
}

logger = logging.getLogger(__name__)


def chunk_text(text: str, max_chars: int | None) -> list[str]:
    """Cut ``text`` into passages of at most ``max_chars`` characters.

    Paragraphs (separated by blank lines) are packed greedily, joined by one blank line; a
    paragraph longer than ``max_chars`` is cut at its last whitespace that fits (anywhere, if a
    single word is longer). ``max_chars=None`` keeps the stripped text whole. Blank text gives []."""
    text = text.strip()
    if not text:
        return []
    if max_chars is None:
        return [text]
    pieces = [p for paragraph in re.split(r"\n\s*\n", text) for p in _cut(paragraph.strip(), max_chars)]
    chunks, current = [], ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if len(joined) <= max_chars:
            current = joined
        else:
            chunks.append(current)
            current = piece
    chunks.append(current)
    return chunks


def _cut(paragraph: str, max_chars: int) -> list[str]:
    pieces = []
    while len(paragraph) > max_chars:
        cut = max(paragraph.rfind(space, 0, max_chars + 1) for space in " \n\t")
        if cut <= 0:
            cut = max_chars
        pieces.append(paragraph[:cut].rstrip())
        paragraph = paragraph[cut:].lstrip()
    return pieces + [paragraph] if paragraph else pieces


def validate_chunk_chars(chunk_chars: int | None) -> None:
    if chunk_chars is not None and (
        isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1
    ):
        raise ValueError(f"chunk_chars must be a positive integer or None (whole documents), got {chunk_chars!r}")


def _check_muse_values(options: dict[str, Any]) -> None:
    check_path_option(options, "data_dir")
    check_string_option(options, "hub_name", optional=True)
    if "corpus" in options and options["corpus"] not in HUB_NAMES:
        raise ValueError(f"unknown MUSE corpus {options['corpus']!r}; expected one of {list(HUB_NAMES)}")
    check_names_option(options, "retain_sets", RETAIN_SETS)
    validate_chunk_chars(options.get("chunk_chars"))


@checked_options("muse", _check_muse_values)
def load_muse(
    data_dir: str | Path | None = None,
    *,
    corpus: str = "news",
    retain_sets: Sequence[str] = ("retain1",),
    chunk_chars: int | None = DEFAULT_CHUNK_CHARS,
    hub_name: str | None = None,
) -> Benchmark:
    """Load MUSE ``corpus`` (``news`` or ``books``) from ``data_dir`` (the corpus directory, or the
    repository's ``data/`` holding ``<corpus>/``), or from the hub (``hub_name``, default the
    corpus's ``muse-bench`` dataset) when ``data_dir`` is None.

    ``retain_sets``: the raw retain splits that form ``retain_text``; MUSE's unlearning baselines
    use ``retain1`` and keep ``retain2`` for evaluation. See the module docstring for the mapping."""
    retain_sets = (retain_sets,) if isinstance(retain_sets, str) else tuple(retain_sets)
    if data_dir is None:
        source = f"hub:{hub_name or HUB_NAMES[corpus]}"
        get = _hub_getter(hub_name or HUB_NAMES[corpus])
    else:
        root = check_directory(data_dir, "MUSE")
        if not (root / "raw").is_dir() and (root / corpus / "raw").is_dir():
            root = root / corpus
        source = str(root)
        get = _local_getter(root)

    tables: list[Table] = []
    skipped: Counter[str] = Counter()  # empty text rows, by table source

    def required(config: str, split: str) -> Table:
        table = get(config, split)
        if table is None:
            raise UserError(f"MUSE data is missing {Path(source) / config / split}.txt (or .json, .jsonl)")
        tables.append(table)
        return table

    def optional(config: str, split: str) -> Table | None:
        table = get(config, split)
        if table is not None:
            tables.append(table)
        return table

    def passages(table: Table, subject: str) -> list[Passage]:
        texts = _texts(table, skipped)
        if not texts:
            raise UserError(f"{table.source} has no non-empty text")
        return [Passage(chunk, subject) for text in texts for chunk in chunk_text(text, chunk_chars)]

    splits = {
        "forget_text": passages(required("raw", "forget"), "forget"),
        "retain_text": [p for name in retain_sets for p in passages(required("raw", name), name)],
    }
    if (table := optional("raw", "holdout")) is not None:
        splits["holdout_text"] = passages(table, "holdout")
    if (table := optional("verbmem", "forget")) is not None:
        splits["forget_verbmem"] = [
            Continuation(table.string(where, row, "prompt"), table.string(where, row, "gt"))
            for where, row in table.rows
        ]
    for role in ("forget", "retain"):
        if (table := optional("knowmem", f"{role}_qa")) is not None:
            splits[f"{role}_qa"] = _qas(table)
    few_shot = {
        name: [{"question": r.question, "answer": r.answer} for r in _qas(table)]
        for name in FEW_SHOT_SPLITS
        if (table := optional("knowmem", f"{name}_icl")) is not None
    }
    privleak = {
        name: _texts(table, skipped) for name in PRIVLEAK_SPLITS if (table := optional("privleak", name)) is not None
    }
    if skipped:
        counts = ", ".join(f"{n} in {source}" for source, n in skipped.items())
        logger.warning(f"MUSE: skipped {sum(skipped.values())} empty text(s): {counts}")
    metadata = {
        "source": source,
        "corpus": corpus,
        "retain_sets": list(retain_sets),
        "chunk_chars": chunk_chars,
        "tables": [t.source for t in tables],
        "few_shot": few_shot,
        "privleak": privleak,
    }
    return Benchmark(f"muse-{corpus}", SCHEMA_VERSION, splits, metadata)


def few_shot_examples(benchmark: Benchmark, split: str) -> list[QA]:
    """MUSE's in-context examples for ``split`` (``forget_qa`` or ``retain_qa``), the ``few_shot``
    argument of :func:`robustunlearn.metrics.muse.knowmem`; [] when the benchmark has none."""
    if split not in FEW_SHOT_SPLITS:
        raise ValueError(f"MUSE has few-shot examples for {list(FEW_SHOT_SPLITS)}, not {split!r}")
    return [QA(**example) for example in benchmark.metadata.get("few_shot", {}).get(split, [])]


def privleak_sets(benchmark: Benchmark) -> dict[str, list[Passage]]:
    """MUSE's PrivLeak texts by set (``forget``, ``retain``, ``holdout``; those present): the
    members (forget) and non-members (holdout) of its membership-inference AUC."""
    return {
        name: [Passage(text, subject=name) for text in texts]
        for name, texts in benchmark.metadata.get("privleak", {}).items()
    }


def _local_getter(root: Path) -> Callable[[str, str], Table | None]:
    names = _older_names(root)

    def get(config: str, split: str) -> Table | None:
        extensions = (".txt", ".json", ".jsonl") if config == "raw" else (".json", ".jsonl")
        path = find_file(root / config, names.get((config, split), split), extensions)
        return read_table(path) if path is not None else None

    return get


def _older_names(root: Path) -> dict[tuple[str, str], str]:
    """:data:`OLDER_NAMES` when ``root`` has the older layout's tables (said in one line), else {}.
    A directory with tables of both layouts is refused: which of two retain QA sets is meant
    cannot be guessed."""
    current = [(config, name) for config, name in OLDER_NAMES if find_file(root / config, name)]
    older = [(config, name) for (config, name), old in OLDER_NAMES.items() if find_file(root / config, old)]
    if current and older:
        raise UserError(
            f"MUSE data in {root} mixes the current layout ({', '.join(f'{c}/{n}' for c, n in current)}) "
            f"and the older one ({', '.join(f'{c}/{OLDER_NAMES[c, n]}' for c, n in older)}); keep one"
        )
    if not older:
        return {}
    mapped = ", ".join(f"{c}/{OLDER_NAMES[c, n]} as {c}/{n}" for c, n in older)
    logger.warning(f"MUSE data in {root} has the repository's older layout: reading {mapped}")
    return OLDER_NAMES


def _hub_getter(hub_name: str) -> Callable[[str, str], Table | None]:
    return lambda config, split: hub_table(hub_name, config, split)


def _texts(table: Table, skipped: Counter[str]) -> list[str]:
    """The texts of ``table``'s rows, counting the empty ones in ``skipped`` instead; a malformed
    row (no ``text`` field, not a string) still raises, naming where it is."""
    texts = []
    for where, row in table.rows:
        if _is_empty(row):
            skipped[table.source] += 1
        else:
            texts.append(table.text(where, row))
    return texts


def _is_empty(row: Any) -> bool:
    """A blank string row, or an object whose ``text`` is blank or null (a hub export's empty cell)."""
    if isinstance(row, dict):
        return "text" in row and (row["text"] is None or (isinstance(row["text"], str) and not row["text"].strip()))
    return isinstance(row, str) and not row.strip()


def _qas(table: Table) -> list[QA]:
    return [QA(table.string(where, row, "question"), table.string(where, row, "answer")) for where, row in table.rows]
