"""Per-benchmark evaluation presets: how each benchmark's paper scores a model, as data.

A preset is a set of :class:`~robustunlearn.metrics.suite.EvalSettings` values with the source
they come from. A run uses its benchmark's preset (:data:`BENCHMARK_PRESETS`); a recipe's ``eval:``
section names another (``preset: tofu-openunlearning``) and overrides any field of it
(``max_new_tokens: 64``). The fields a preset sets:

* ``max_new_tokens``: greedy tokens of a QA answer (KnowMem, TOFU's generated answers);
  ``verbmem_max_new_tokens``: of a VerbMem continuation;
* ``qa_rouge`` (``recall`` or ``f1``) and ``rouge_stemmer``: the ROUGE-L of QA answers;
* ``few_shot``: put the benchmark's in-context examples (MUSE's ``*_qa_icl``) before each question;
* ``prompt_template``: the question format (:data:`robustunlearn.data.prompts.PROMPT_TEMPLATES`);
* ``stop_strings``: text a generated answer is cut at (generation always stops at eos);
* ``mcq_format``: ``letters`` (lm-eval's ``wmdp_*``) or ``cloze`` multiple choice;
* ``tofu_max_new_tokens`` and ``tofu_eval_size``: TOFU's generated answers and records per
  evaluation set (forget quality is a KS p-value, so it depends on that n);
* ``level_tolerance``: the matched-forgetting level is the retrain model's value of the level
  metric plus this, in the preset's own metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from robustunlearn.metrics.qa import NEXT_QUESTION_MARKERS


@dataclass(frozen=True)
class EvalPreset:
    name: str
    source: str  # the paper and repository file the values come from
    values: dict[str, Any]


SYNTHETIC_VALUES: dict[str, Any] = {
    "max_new_tokens": 8,  # the embedded benchmark's answers are one to three words
    "verbmem_max_new_tokens": 48,
    "qa_rouge": "recall",
    "rouge_stemmer": False,
    "few_shot": False,
    "prompt_template": "plain",
    "stop_strings": NEXT_QUESTION_MARKERS,
    "mcq_format": "cloze",
    "tofu_max_new_tokens": 64,
    "tofu_eval_size": None,
    "level_tolerance": 0.05,
}
_TOFU_VALUES: dict[str, Any] = {
    **SYNTHETIC_VALUES,
    "max_new_tokens": 200,  # full-sentence answers; generation stops at eos
    "rouge_stemmer": True,
    "stop_strings": (),
    "tofu_max_new_tokens": 200,
    "tofu_eval_size": 300,
}

EVAL_PRESETS: dict[str, EvalPreset] = {
    preset.name: preset
    for preset in (
        EvalPreset(
            "synthetic",
            "robustunlearn's embedded benchmark (data/synthetic.py): its own short answers, cloze multiple choice",
            SYNTHETIC_VALUES,
        ),
        EvalPreset(
            "muse",
            "MUSE, Shi et al. 2024 (github.com/swj0419/muse_bench eval.py, metrics/verbmem.py, metrics/knowmem.py)",
            {
                **SYNTHETIC_VALUES,
                "max_new_tokens": 32,
                "verbmem_max_new_tokens": 128,
                "qa_rouge": "f1",
                "few_shot": True,
                "prompt_template": "muse",
            },
        ),
        EvalPreset(
            "tofu",
            "TOFU, Maini et al. 2024 (github.com/locuslab/tofu config/eval_everything.yaml: ds_size 300; "
            "evaluate_util.py): the paper's tables",
            _TOFU_VALUES,
        ),
        EvalPreset(
            "tofu-openunlearning",
            "open-unlearning's TOFU (github.com/locuslab/open-unlearning configs/eval/tofu.yaml): all 400 forget10 "
            "records, its leaderboard",
            {**_TOFU_VALUES, "tofu_eval_size": 400},
        ),
        EvalPreset(
            "wmdp",
            "WMDP, Li et al. 2024, as lm-evaluation-harness scores it (lm_eval/tasks/wmdp/_default_template_yaml)",
            {**SYNTHETIC_VALUES, "mcq_format": "letters"},
        ),
    )
}
BENCHMARK_PRESETS: dict[str, str] = {"synthetic": "synthetic", "tofu": "tofu", "muse": "muse", "wmdp": "wmdp"}
DEFAULT_PRESET = "synthetic"


def preset_for_benchmark(benchmark: str) -> str:
    """The name of the preset a run on ``benchmark`` (a :data:`robustunlearn.data.BENCHMARKS` name)
    evaluates with unless its recipe names another."""
    return BENCHMARK_PRESETS.get(benchmark, DEFAULT_PRESET)
