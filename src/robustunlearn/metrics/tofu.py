"""TOFU metrics (Maini et al., 2024, "TOFU: A Task of Fictitious Unlearning for LLMs", as computed
by github.com/locuslab/tofu ``evaluate_util.py`` and ``aggregate_eval_stat.py``).

All probabilities are length-normalised: ``P(a|q)^(1/|a|) = exp(-mean NLL)`` over the answer
tokens ``tokens(completion(a)) + [eos]`` after ``[bos] + prompt(q)`` in the prompt template (by default
``qa_prompt(q)`` and ``" " + a``; TOFU scores the ``eos`` too).

* Probability: ``P(a|q)^(1/|a|)`` on forget/retain; on real authors and world facts the
  answer's share among the options, ``P(a) / (P(a) + sum_i P(perturbed_i))`` (``normalise_prob``).
* ROUGE: ROUGE-L recall (Porter stemmer, as TOFU) of the greedy answer against the answer.
* Truth ratio, per question: ``R = Pbar_perturbed / P(paraphrased)`` where ``Pbar`` is the
  geometric mean over the perturbed answers of their normalised probabilities (TOFU's code
  averages their NLLs; the paper writes an arithmetic mean). The paraphrased answer falls back to
  the answer when a record has none. Reported: ``mean(min(R, 1/R))`` on the forget set (1 means
  the model cannot tell true from false), ``mean(max(0, 1 - R))`` elsewhere (high means it prefers
  the truth).
* Forget quality: the KS-test p-value between the forget-set ``R`` of the unlearned and of the
  retrain model (TOFU tests ``1/R``; the KS test is invariant to that monotone map).
* Model utility: harmonic mean of probability, ROUGE and truth ratio on retain, real authors and
  world facts (9 numbers); sets that a benchmark lacks are left out.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from scipy.stats import ks_2samp

from robustunlearn.data.base import QA
from robustunlearn.data.prompts import PLAIN_TEMPLATE, PromptTemplate
from robustunlearn.metrics.likelihood import completion_scores
from robustunlearn.metrics.qa import NEXT_QUESTION_MARKERS, answer_questions
from robustunlearn.metrics.rouge import rouge_l_scores


def truth_ratio(paraphrased_nll: float, perturbed_nlls: Sequence[float]) -> float:
    """``R = exp(nll_paraphrased - mean_i nll_perturbed_i)`` from mean per-token NLLs."""
    if not perturbed_nlls:
        raise ValueError("the truth ratio needs at least one perturbed answer")
    return math.exp(paraphrased_nll - sum(perturbed_nlls) / len(perturbed_nlls))


def truth_ratio_stat(ratios: Sequence[float], *, forget: bool) -> float:
    """``mean(min(R, 1/R))`` for the forget set, ``mean(max(0, 1 - R))`` otherwise."""
    if not ratios:
        raise ValueError("cannot average an empty list of truth ratios")
    values = [min(r, 1.0 / r) if forget else max(0.0, 1.0 - r) for r in ratios]
    return sum(values) / len(values)


def tofu_eval_set(
    model,
    tokenizer,
    records: Sequence[QA],
    *,
    forget: bool,
    normalise_prob: bool = False,
    template: PromptTemplate = PLAIN_TEMPLATE,
    stop_strings: Sequence[str] = NEXT_QUESTION_MARKERS,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
) -> dict:
    """Probability, ROUGE and truth ratio of one TOFU evaluation set (see the module docstring).

    ``forget`` selects the truth-ratio statistic; ``normalise_prob`` is TOFU's setting for the real
    authors and world facts sets. Every record needs ``perturbed_answers``. ``template`` is the
    prompt format (TOFU's Llama-2 checkpoints: ``llama2-chat``); greedy answers of up to
    ``max_new_tokens`` tokens (TOFU: 200) are cut at ``stop_strings`` (TOFU: none, only eos).

    Returns ``{"forget", "prob", "rouge", "truth_ratio"}`` and the per-record ``"probs"``,
    ``"rouges"``, ``"truth_ratios"`` (raw ``R``, the input of :func:`forget_quality`), ``"answers"``."""
    if not records:
        raise ValueError("cannot evaluate an empty list of QA records")
    for i, record in enumerate(records):
        if not record.perturbed_answers:
            raise ValueError(f"record {i} ({record.question!r}) has no perturbed_answers; TOFU metrics need them")
    # One scoring pass over, per record: the answer, the paraphrased answer, the perturbed answers.
    prompts, completions = [], []
    for record in records:
        for answer in (record.answer, record.paraphrased_answer or record.answer, *record.perturbed_answers):
            prompts.append(template.prompt(record.question, tokenizer))
            completions.append(template.completion(answer))
    nlls = iter(
        s.nll
        for s in completion_scores(
            model, tokenizer, prompts, completions, add_eos=True, batch_size=batch_size, progress=progress
        )
    )
    probs, ratios = [], []
    for record in records:
        answer_nll, paraphrased_nll = next(nlls), next(nlls)
        perturbed_nlls = [next(nlls) for _ in record.perturbed_answers]
        prob = math.exp(-answer_nll)
        if normalise_prob:
            prob /= prob + sum(math.exp(-nll) for nll in perturbed_nlls)
        probs.append(prob)
        ratios.append(truth_ratio(paraphrased_nll, perturbed_nlls))
    answers = answer_questions(
        model,
        tokenizer,
        records,
        template=template,
        stop_strings=stop_strings,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=progress,
    )
    rouges = rouge_l_scores([r.answer for r in records], answers, "recall", use_stemmer=True)
    return {
        "forget": forget,
        "prob": sum(probs) / len(probs),
        "rouge": sum(rouges) / len(rouges),
        "truth_ratio": truth_ratio_stat(ratios, forget=forget),
        "probs": probs,
        "rouges": rouges,
        "truth_ratios": ratios,
        "answers": answers,
    }


def forget_quality(truth_ratios: Sequence[float], retrain_truth_ratios: Sequence[float]) -> float:
    """p-value of the two-sample Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``, two-sided)
    between the forget-set truth ratios of the evaluated and of the retrain model; high (up to 1)
    when they are indistinguishable."""
    if not truth_ratios or not retrain_truth_ratios:
        raise ValueError("forget quality needs truth ratios from both models")
    return float(ks_2samp(truth_ratios, retrain_truth_ratios).pvalue)


def model_utility(results: Mapping[str, Mapping[str, float]]) -> float:
    """Harmonic mean of ``prob``, ``rouge`` and ``truth_ratio`` over the given non-forget sets,
    e.g. ``{"retain": ..., "real_authors": ..., "world_facts": ...}`` from :func:`tofu_eval_set`
    (TOFU's 9 numbers when all three are there). 0 if any number is 0."""
    if not results:
        raise ValueError("model utility needs at least one evaluated set (retain, real_authors, world_facts)")
    values = []
    for name, result in results.items():
        if result.get("forget"):
            raise ValueError(f"set {name!r} was evaluated as a forget set; model utility excludes the forget set")
        values += [result["prob"], result["rouge"], result["truth_ratio"]]
    if min(values) <= 0.0:
        return 0.0
    return len(values) / sum(1.0 / v for v in values)
