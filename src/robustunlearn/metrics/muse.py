"""MUSE's data-owner metrics (Shi et al., 2024, "MUSE: Machine Unlearning Six-Way Evaluation for
Language Models", github.com/swj0419/muse_bench): VerbMem, KnowMem and PrivLeak."""

from __future__ import annotations

from collections.abc import Sequence

from robustunlearn.data.base import QA, Continuation
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate
from robustunlearn.metrics.generation import generate_greedy
from robustunlearn.metrics.qa import answer_questions
from robustunlearn.metrics.rouge import RougeKind, rouge_l_scores


def cut_to_tokens(tokenizer, text: str, max_tokens: int) -> str:
    """The prefix of ``text`` covered by its first ``max_tokens`` tokens (cut at the character
    offset where that token ends, so the kept text is unchanged; ``text`` itself if shorter)."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    if len(offsets) <= max_tokens:
        return text
    return text[: offsets[max_tokens - 1][1]]


def verbmem_from_generations(
    tokenizer, generations: Sequence[str], records: Sequence[Continuation], max_new_tokens: int
) -> dict:
    """ROUGE-L F1 of each generation against its true continuation cut to ``max_new_tokens`` tokens."""
    references = [cut_to_tokens(tokenizer, r.continuation, max_new_tokens) for r in records]
    scores = rouge_l_scores(references, generations, "f1")
    return {
        "mean": _mean(scores),
        "scores": scores,
        "generations": list(generations),
        "references": references,
    }


def verbmem(
    model,
    tokenizer,
    records: Sequence[Continuation],
    *,
    max_new_tokens: int = 128,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """VerbMem: how verbatim the model continues forget-set text.

    As MUSE's ``metrics/verbmem.py``: greedy-generate up to ``max_new_tokens`` (128) tokens after
    the prefix, cut the reference continuation to its first ``max_new_tokens`` tokens (the
    generation budget, not the length actually generated: stopping early is not rewarded), and
    take ROUGE-L F1 (rouge-score, no stemmer; MUSE aggregates ``mean_rougeL``, the F-measure).
    The prefix is fed after ``bos`` (as MUSE's Llama tokenizer did). One difference: the cut keeps
    exactly ``max_new_tokens`` tokens (MUSE's cut counted the ``bos`` it added, keeping one fewer).

    Returns ``{"mean", "scores", "generations", "references"}``."""
    generations = generate_greedy(
        model, tokenizer, [r.prefix for r in records], max_new_tokens, batch_size, progress=progress
    )
    return verbmem_from_generations(tokenizer, generations, records, max_new_tokens)


def knowmem_from_answers(
    answers: Sequence[str], records: Sequence[QA], rouge: RougeKind = "f1", *, use_stemmer: bool = False
) -> dict:
    """ROUGE-L (``rouge``: MUSE's F1 by default; stemmed with ``use_stemmer``) of each answer against
    the reference answer."""
    scores = rouge_l_scores([r.answer for r in records], answers, rouge, use_stemmer=use_stemmer)
    return {"mean": _mean(scores), "scores": scores, "answers": list(answers)}


def knowmem(
    model,
    tokenizer,
    records: Sequence[QA],
    *,
    few_shot: Sequence[QA] = (),
    template: PromptTemplate = PLAIN_TEMPLATE,
    max_new_tokens: int = 32,
    rouge: RougeKind = "f1",
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """KnowMem: whether the model still answers questions about the forget set.

    Greedy answers (up to 32 new tokens, MUSE's default) to the question after the few-shot
    examples (:func:`robustunlearn.metrics.qa.answer_questions`; MUSE's are
    :func:`robustunlearn.data.muse.few_shot_examples`), cut at a model-invented next question and
    scored by ROUGE-L F1 against the reference answer, as MUSE's ``eval.py`` aggregates
    (``mean_rougeL``): "The answer is 1472" for "1472" scores 0.4 (its recall, ``rouge="recall"``,
    would be 1.0). MUSE's exact prompt ends ``"Answer: "`` with a space: ``template`` ``muse``
    (:data:`robustunlearn.data.prompts.PROMPT_TEMPLATES`).

    Returns ``{"mean", "scores", "answers"}``."""
    answers = answer_questions(
        model,
        tokenizer,
        records,
        few_shot=few_shot,
        template=template,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    return knowmem_from_answers(answers, records, rouge)


def privleak(auc_model: float, auc_retrain: float) -> float:
    """PrivLeak in percent, with MUSE's sign: ``(AUC_model - AUC_retrain) / AUC_retrain * 100``
    where MUSE's AUC (Min-K%, k = 40%) scores *holdout* texts as the positives against forget
    texts. That AUC is ``1 - a`` for the membership AUCs ``a`` of :mod:`robustunlearn.metrics.mia`
    (forget = members, > 0.5 when members are detected), which this function takes:

    ``privleak = ((1 - a_model) - (1 - a_retrain)) / (1 - a_retrain) * 100``.

    0 is ideal (as private as retraining). Negative: the forget set is still recognisable as
    training data (under-unlearned; the original model scores near -100). Positive: the forget set
    now looks *less* familiar than unseen text (over-unlearned), itself a membership signal."""
    for name, value in (("auc_model", auc_model), ("auc_retrain", auc_retrain)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be an AUC in [0, 1], got {value}")
    if auc_retrain == 1.0:
        raise ValueError(
            "auc_retrain is 1: the retrain model separates the forget set perfectly; PrivLeak is undefined"
        )
    return ((1.0 - auc_model) - (1.0 - auc_retrain)) / (1.0 - auc_retrain) * 100.0


def _mean(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("cannot average an empty list of scores")
    return sum(values) / len(values)
