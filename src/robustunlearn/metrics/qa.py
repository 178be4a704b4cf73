"""Greedy answers to QA prompts, and whether they contain the reference answer."""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

from robustunlearn.data.base import QA
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate, qa_completion, qa_prompt
from robustunlearn.metrics.generation import generate_greedy
from robustunlearn.metrics.likelihood import completion_logprobs

_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")
# A model-invented next question: the few-shot separators MUSE cuts answers at.
NEXT_QUESTION_MARKERS = ("\n\n", "\nQuestion", "Question:")


def few_shot_prefix(few_shot: Sequence[QA], template: PromptTemplate = PLAIN_TEMPLATE, tokenizer=None) -> str:
    """Solved examples put before the question, one blank line after each:
    ``template.prompt(q) + template.completion(a) + "\\n\\n"`` (MUSE's in-context format with the
    ``muse`` template)."""
    return "".join(
        template.prompt(shot.question, tokenizer) + template.completion(shot.answer) + "\n\n" for shot in few_shot
    )


def answer_questions(
    model,
    tokenizer,
    records: Sequence[QA],
    *,
    few_shot: Sequence[QA] = (),
    template: PromptTemplate = PLAIN_TEMPLATE,
    stop_strings: Sequence[str] = NEXT_QUESTION_MARKERS,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> list[str]:
    """Greedy answers to ``few_shot_prefix(few_shot) + template.prompt(question)``, with surrounding
    whitespace stripped. Generation stops at eos; text from the first of ``stop_strings`` on is
    dropped (by default a model-invented next question, ``"\\n\\n"`` or ``"Question"``, the
    few-shot separators, as MUSE does; TOFU cuts nothing: ``stop_strings=()``)."""
    prefix = few_shot_prefix(few_shot, template, tokenizer)
    prompts = [prefix + template.prompt(r.question, tokenizer) for r in records]
    answers = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    return [cut_at_stop_strings(a, stop_strings).strip() for a in answers]


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stop_strings``."""
    for stop in stop_strings:
        text = text.split(stop)[0]
    return text


def normalize_answer(text: str) -> str:
    """Lower case, punctuation turned into spaces, runs of whitespace collapsed to one space."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def contains_answer(prediction: str, reference: str) -> bool:
    """Whether the normalized reference occurs in the normalized prediction as whole words
    (``"1990"`` does not contain ``"199"``)."""
    target = normalize_answer(reference)
    if not target:
        raise ValueError(f"reference answer {reference!r} is empty after normalization")
    return f" {target} " in f" {normalize_answer(prediction)} "


def accuracy_from_answers(answers: Sequence[str], records: Sequence[QA]) -> dict:
    """``{"accuracy": fraction correct, "correct": per-record booleans}``."""
    if len(answers) != len(records):
        raise ValueError(f"got {len(answers)} answers for {len(records)} records")
    if not records:
        raise ValueError("cannot score an empty list of QA records")
    correct = [contains_answer(a, r.answer) for a, r in zip(answers, records)]
    return {"accuracy": sum(correct) / len(correct), "correct": correct}


def qa_accuracy(
    model,
    tokenizer,
    records: Sequence[QA],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Fraction of greedy answers that contain the reference answer (:func:`contains_answer`),
    plus the answers themselves."""
    answers = answer_questions(
        model, tokenizer, records, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    return {**accuracy_from_answers(answers, records), "answers": answers}


def qa_answer_nll(model, tokenizer, records: Sequence[QA], *, batch_size: int = 16) -> float:
    """Mean over records of the mean token NLL of ``qa_completion(answer)`` after ``qa_prompt(question)``
    (teacher-forced: one forward pass per batch, no generation)."""
    if not records:
        raise ValueError("cannot score an empty list of QA records")
    logprobs = completion_logprobs(
        model,
        tokenizer,
        [qa_prompt(r.question) for r in records],
        [qa_completion(r.answer) for r in records],
        batch_size=batch_size,
    )
    return float(sum(-lp.mean() for lp in logprobs) / len(logprobs))
