"""Evaluation metrics: batched, under ``torch.no_grad()``, on the model's device, restoring the
model's train/eval mode afterwards.

Every sequence is ``[bos] + tokens(prompt) + tokens(completion)``, prompt and completion tokenized
separately, as in training (:mod:`robustunlearn.data.collate`).
"""

from robustunlearn.metrics.generation import generate_greedy
from robustunlearn.metrics.likelihood import (
    TokenScores,
    completion_logprobs,
    completion_scores,
    next_token_stats,
)
from robustunlearn.metrics.mcq import mcq_accuracy, mcq_from_loglikelihoods
from robustunlearn.metrics.mia import mia_aucs, mia_scores, mia_suite, min_k, min_k_plus_plus
from robustunlearn.metrics.muse import cut_to_tokens, knowmem, knowmem_from_answers, privleak, verbmem
from robustunlearn.metrics.perplexity import perplexity
from robustunlearn.metrics.qa import (
    accuracy_from_answers,
    answer_questions,
    contains_answer,
    qa_accuracy,
    qa_answer_nll,
)
from robustunlearn.metrics.rouge import RougeL, rouge_l, rouge_l_scores
from robustunlearn.metrics.tofu import (
    forget_quality,
    model_utility,
    tofu_eval_set,
    truth_ratio,
    truth_ratio_stat,
)

__all__ = [
    "RougeL",
    "TokenScores",
    "accuracy_from_answers",
    "answer_questions",
    "completion_logprobs",
    "completion_scores",
    "contains_answer",
    "cut_to_tokens",
    "forget_quality",
    "generate_greedy",
    "knowmem",
    "knowmem_from_answers",
    "mcq_accuracy",
    "mcq_from_loglikelihoods",
    "mia_aucs",
    "mia_scores",
    "mia_suite",
    "min_k",
    "min_k_plus_plus",
    "model_utility",
    "next_token_stats",
    "perplexity",
    "privleak",
    "qa_accuracy",
    "qa_answer_nll",
    "rouge_l",
    "rouge_l_scores",
    "tofu_eval_set",
    "truth_ratio",
    "truth_ratio_stat",
    "verbmem",
]
