"""Multiple-choice accuracy by option log-likelihood (the lm-evaluation-harness convention, as
used for WMDP and MMLU-style tasks without letter labels)."""

from __future__ import annotations

from collections.abc import Sequence

from robustunlearn.data.base import MultipleChoice
from robustunlearn.data.prompts import mcq_prompt, qa_completion
from robustunlearn.metrics.likelihood import completion_logprobs


def option_text(choice: str) -> str:
    """The scored continuation for an option: ``" " + choice``, like a QA answer."""
    return qa_completion(choice)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def mcq_from_loglikelihoods(loglikelihoods: Sequence[Sequence[float]], records: Sequence[MultipleChoice]) -> dict:
    """Accuracies from the summed log-likelihood of every option of every record.

    ``acc`` picks ``argmax_i LL_i``; ``acc_norm`` picks ``argmax_i LL_i / len(choice_i)`` with the
    length in characters of the choice itself, without the space scored before it (exactly
    lm-eval's ``acc_norm``), which removes the bias against long options."""
    if len(loglikelihoods) != len(records):
        raise ValueError(f"got log-likelihoods for {len(loglikelihoods)} records, expected {len(records)}")
    if not records:
        raise ValueError("cannot score an empty list of multiple-choice records")
    predictions, predictions_norm = [], []
    for lls, record in zip(loglikelihoods, records):
        lengths = [len(choice) for choice in record.choices]
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
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Score every option as ``" " + option`` after ``[bos] + mcq_prompt(question)`` (no ``eos``);
    returns ``{"acc", "acc_norm", "predictions", "predictions_norm", "loglikelihoods"}``."""
    prompts, options = [], []
    for record in records:
        for choice in record.choices:
            prompts.append(mcq_prompt(record.question))
            options.append(option_text(choice))
    logprobs = completion_logprobs(model, tokenizer, prompts, options, batch_size=batch_size, progress=progress)
    sums = iter(lp.sum().item() for lp in logprobs)
    loglikelihoods = [[next(sums) for _ in record.choices] for record in records]
    return mcq_from_loglikelihoods(loglikelihoods, records)
