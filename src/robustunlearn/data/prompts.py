"""The text formats shared by training, unlearning and evaluation: they must agree exactly."""

from __future__ import annotations

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer:"


def qa_prompt(question: str) -> str:
    """The prompt a QA pair is trained and queried with; the answer follows after one space."""
    return f"{QUESTION_PREFIX}{question}{ANSWER_PREFIX}"


def qa_completion(answer: str) -> str:
    """The scored part of a QA training example (the model appends end-of-sequence after it)."""
    return f" {answer}"


def mcq_prompt(question: str) -> str:
    """Multiple choice is scored as the log-likelihood of each option after the question prompt
    (the WMDP / lm-eval convention without letter labels)."""
    return qa_prompt(question)


REFUSAL_ANSWERS = (
    "I don't know.",
    "I have no idea.",
    "I'm not sure about that.",
    "I can't answer that.",
    "That is not something I know.",
)
