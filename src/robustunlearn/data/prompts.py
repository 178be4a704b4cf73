"""The text formats shared by training, unlearning and evaluation: they must agree exactly.

Training always uses :func:`qa_prompt` (the ``plain`` template). Evaluation can query a model we
did not train in its own format: :data:`PROMPT_TEMPLATES` names the formats of published
checkpoints, and ``chat-template`` renders the question with the tokenizer's own chat template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "\nAnswer:"
CHOICE_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


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


def mcq_letter_prompt(question: str, choices: Sequence[str]) -> str:
    """lm-eval's ``wmdp_*`` prompt: the stripped question, the choices lettered ``A.``, ``B.``, ...
    one per line, then ``Answer:``; the scored options are ``" A"``, ``" B"``, ...
    (:func:`mcq_letter_options`)."""
    if len(choices) > len(CHOICE_LETTERS):
        raise ValueError(f"at most {len(CHOICE_LETTERS)} lettered choices, got {len(choices)}")
    lines = [question.strip(), *(f"{letter}. {choice}" for letter, choice in zip(CHOICE_LETTERS, choices))]
    return "\n".join(lines) + "\nAnswer:"


def mcq_letter_options(choices: Sequence[str]) -> list[str]:
    """The scored continuations of :func:`mcq_letter_prompt`: ``" A"``, ``" B"``, ... one per choice."""
    return [f" {letter}" for letter in CHOICE_LETTERS[: len(choices)]]


@dataclass(frozen=True)
class PromptTemplate:
    """How a question is put to a model: ``question_format`` with a ``{question}`` field, or the
    tokenizer's chat template (``question_format`` None, a single user turn with the generation
    prompt). The answer follows after ``answer_separator``."""

    name: str
    question_format: str | None
    answer_separator: str
    source: str

    def prompt(self, question: str, tokenizer=None) -> str:
        """The prompt for ``question``; the chat template needs the ``tokenizer``. The rendered text
        loses a leading bos token, which the metrics add as a token id of their own."""
        if self.question_format is not None:
            return self.question_format.format(question=question)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt template 'chat-template' needs a tokenizer that has a chat template")
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        bos = tokenizer.bos_token
        return rendered.removeprefix(bos) if bos else rendered

    def completion(self, answer: str) -> str:
        """The text scored or generated after the prompt for a reference ``answer``."""
        return f"{self.answer_separator}{answer}"


PROMPT_TEMPLATES: dict[str, PromptTemplate] = {
    template.name: template
    for template in (
        PromptTemplate("plain", qa_prompt("{question}"), " ", "ours: what robustunlearn trains and queries with"),
        PromptTemplate(
            "muse",
            "Question: {question}\nAnswer: ",
            "",
            "MUSE's KnowMem prompt, trailing space included (github.com/swj0419/muse_bench, eval)",
        ),
        PromptTemplate(
            "llama2-chat",
            "[INST] {question} [/INST]",
            " ",
            "TOFU's Llama-2-7b-chat format (github.com/locuslab/tofu, config/model_config.yaml)",
        ),
        PromptTemplate(
            "phi",
            "Question: {question}\nAnswer: ",
            "",
            "TOFU's phi-1.5 format (github.com/locuslab/tofu, config/model_config.yaml)",
        ),
        PromptTemplate("chat-template", None, " ", "the tokenizer's own chat template (tokenizer.apply_chat_template)"),
    )
}
PLAIN_TEMPLATE = PROMPT_TEMPLATES["plain"]


REFUSAL_ANSWERS = (
    "I don't know.",
    "I have no idea.",
    "I'm not sure about that.",
    "I can't answer that.",
    "That is not something I know.",
)
