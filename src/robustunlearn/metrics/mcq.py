"""Multiple-choice accuracy by option log-likelihood, in the two formats of the
lm-evaluation-harness:

* ``letters`` (what WMDP reports, lm-eval's ``wmdp_*`` tasks): the question, the choices lettered
  ``A.`` to ``D.``, ``Answer:``; the scored options are the letter tokens ``" A"``, ``" B"``, ...;
* ``cloze``: the question prompt alone, the choices' own texts scored after it (MMLU-style cloze
  tasks). Not WMDP's number: near chance for small models and biased toward short options.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from robustunlearn.data.base import MultipleChoice
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate, mcq_letter_options, mcq_letter_prompt
from robustunlearn.metrics.likelihood import completion_logprobs

McqFormat = Literal["letters", "cloze"]
MCQ_FORMATS: tuple[McqFormat, ...] = ("letters", "cloze")


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mcq_from_loglikelihoods(
    loglikelihoods: Sequence[Sequence[float]],
    records: Sequence[MultipleChoice],
    option_lengths: Sequence[Sequence[int]] | None = None,
) -> dict:
    """Accuracies from the summed log-likelihood of every option of every record.

    ``acc`` picks ``argmax_i LL_i``; ``acc_norm`` picks ``argmax_i LL_i / len_i`` where ``len_i``
    is ``option_lengths`` (default: the length in characters of the choice itself, without the
    space scored before it; exactly lm-eval's ``acc_norm``), which removes the bias against long
    options."""
    if len(loglikelihoods) != len(records):
        raise ValueError(f"got log-likelihoods for {len(loglikelihoods)} records, expected {len(records)}")
    if not records:
        raise ValueError("cannot score an empty list of multiple-choice records")
    if option_lengths is None:
        option_lengths = [[len(choice) for choice in record.choices] for record in records]
    predictions, predictions_norm = [], []
    for lls, lengths in zip(loglikelihoods, option_lengths):
        predictions.append(argmax(lls))
        predictions_norm.append(argmax([ll / n for ll, n in zip(lls, lengths)]))
    answers = [r.answer_index for r in records]
    return {
        "acc": sum(p == a for p, a in zip(predictions, answers)) / len(records),
        "acc_norm": sum(p == a for p, a in zip(predictions_norm, answers)) / len(records),
        "predictions": predictions,
        "predictions_norm": predictions_norm,
        "loglikelihoods": [list(lls) for lls in loglikelihoods],
    }


def mcq_accuracy(
    model,
    tokenizer,
    records: Sequence[MultipleChoice],
    *,
    mcq_format: McqFormat = "cloze",
    template: PromptTemplate = PLAIN_TEMPLATE,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Score every option after ``[bos] + prompt`` (no ``eos``) and pick the likeliest.

    ``letters``: the prompt is :func:`~robustunlearn.data.prompts.mcq_letter_prompt` and the
    options ``" A"``, ``" B"``, ... (lm-eval's ``wmdp_*``; ``acc_norm`` divides by the letter's
    length, 1, so it equals ``acc``). ``cloze``: the prompt is ``template.prompt(question)`` and
    the options ``template.completion(choice)`` (``" " + choice`` for the ``plain`` template).

    Returns ``{"acc", "acc_norm", "predictions", "predictions_norm", "loglikelihoods"}``."""
    if mcq_format not in MCQ_FORMATS:
        raise ValueError(f"unknown multiple-choice format {mcq_format!r}; expected one of {list(MCQ_FORMATS)}")
    prompts, options, option_lengths = [], [], []
    for record in records:
        if mcq_format == "letters":
            prompt = mcq_letter_prompt(record.question, record.choices)
            texts = mcq_letter_options(record.choices)
            option_lengths.append([len(text.strip()) for text in texts])
        else:
            prompt = template.prompt(record.question, tokenizer)
            texts = [template.completion(choice) for choice in record.choices]
            option_lengths.append([len(choice) for choice in record.choices])
        prompts += [prompt] * len(texts)
        options += texts
    logprobs = completion_logprobs(model, tokenizer, prompts, options, batch_size=batch_size, progress=progress)
    sums = iter(lp.sum().item() for lp in logprobs)
    loglikelihoods = [[next(sums) for _ in record.choices] for record in records]
    return mcq_from_loglikelihoods(loglikelihoods, records, option_lengths)
