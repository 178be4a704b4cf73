"""Per-benchmark evaluation presets: each benchmark is scored as its paper scores it (MUSE's
KnowMem F1 with in-context examples, TOFU's stemmed ROUGE recall on full answers, WMDP's lettered
multiple choice as lm-eval's ``wmdp_*``), a recipe overrides a preset field by field, and a
model we did not train is queried in its own prompt format."""

from __future__ import annotations

import copy
import importlib.util
import json
from types import SimpleNamespace

import pytest

from helpers import WMDP_QUESTIONS
from robustunlearn.config import load_settings
from robustunlearn.core.errors import UserError
from robustunlearn.data.base import QA, Benchmark
from robustunlearn.data.prompts import PROMPT_TEMPLATES, mcq_letter_prompt
from robustunlearn.data.wmdp import load_wmdp
from robustunlearn.metrics.lm_eval_backend import run_lm_eval
from robustunlearn.metrics.mcq import mcq_accuracy
from robustunlearn.metrics.muse import knowmem_from_answers
from robustunlearn.metrics.presets import EVAL_PRESETS, SYNTHETIC_VALUES
from robustunlearn.metrics.suite import EvalSettings, describe_eval, evaluate_model, tofu_scores
from robustunlearn.metrics.tofu import tofu_eval_set

needs_lm_eval = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None,
    reason="lm-eval is not installed (pip install 'robustunlearn[lm-eval]')",
)
LETTER_TASK = "tiny_wmdp_bio_letters"


class RecordedGeneration:
    """Stands in for greedy decoding: records the prompts and token budget, returns ``reply``."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.prompts: list[str] = []
        self.max_new_tokens: list[int] = []

    def __call__(self, model, tokenizer, prompts, max_new_tokens, batch_size=16, *, progress=False):
        self.prompts += list(prompts)
        self.max_new_tokens.append(max_new_tokens)
        return [self.reply for _ in prompts]


def scored_answers(monkeypatch, reply: str, benchmark: Benchmark, settings: EvalSettings, metric: str):
    generation = RecordedGeneration(reply)
    monkeypatch.setattr("robustunlearn.metrics.qa.generate_greedy", generation)
    return evaluate_model(None, None, benchmark, settings, metrics=(metric,))[metric], generation


def muse_like(answer: str = "1472") -> Benchmark:
    few_shot = {
        "forget_qa": [{"question": "Who wrote it?", "answer": "Ann"}, {"question": "When?", "answer": "1999"}],
        "retain_qa": [{"question": "Where?", "answer": "Oslo"}],
    }
    splits = {"forget_qa": [QA("In which year?", answer)], "retain_qa": [QA("Which city?", "Rome")]}
    return Benchmark("muse-news", "1", splits, {"few_shot": few_shot})


def test_knowmem_is_rouge_l_f1_not_recall():
    records = [QA("In which year?", "1472")]
    assert knowmem_from_answers(["The answer is 1472"], records)["mean"] == pytest.approx(0.4)  # P 1/4, R 1
    assert knowmem_from_answers(["The answer is 1472"], records, "recall")["mean"] == pytest.approx(1.0)


def test_muse_knowmem_prompt_has_the_in_context_examples_and_ends_with_answer_space(monkeypatch):
    settings = EvalSettings(preset="muse")
    score, generation = scored_answers(monkeypatch, "The answer is 1472", muse_like(), settings, "forget_qa_rouge")
    assert generation.prompts == [
        "Question: Who wrote it?\nAnswer: Ann\n\nQuestion: When?\nAnswer: 1999\n\nQuestion: In which year?\nAnswer: "
    ]
    assert generation.max_new_tokens == [32]
    assert score == pytest.approx(0.4)  # F1
    _, generation = scored_answers(monkeypatch, "Rome", muse_like(), settings, "retain_qa_rouge")
    assert generation.prompts == ["Question: Where?\nAnswer: Oslo\n\nQuestion: Which city?\nAnswer: "]
    assert settings.verbmem_max_new_tokens == 128


def test_muse_knowmem_cuts_a_model_invented_next_question(monkeypatch):
    score, _ = scored_answers(
        monkeypatch, "1472\n\nQuestion: And?", muse_like(), EvalSettings(preset="muse"), "forget_qa_rouge"
    )
    assert score == pytest.approx(1.0)


def test_tofu_scores_full_answers_by_stemmed_recall_without_stop_strings(monkeypatch):
    benchmark = Benchmark("tofu", "1", {"forget_qa": [QA("What does she do?", "She runs marathons.")]})
    reply = "She is running\n\nmarathons every year."
    score, generation = scored_answers(monkeypatch, reply, benchmark, EvalSettings(preset="tofu"), "forget_qa_rouge")
    assert generation.max_new_tokens == [200]
    assert generation.prompts == ["Question: What does she do?\nAnswer:"]
    assert score == pytest.approx(1.0)  # "running" stems to "run" as "runs" does; nothing cut at "\n\n"
    synthetic, _ = scored_answers(monkeypatch, reply, benchmark, EvalSettings(), "forget_qa_rouge")
    assert synthetic == pytest.approx(1 / 3)  # no stemmer, cut at "\n\n": only "she" matches


def test_synthetic_preset_is_the_settings_every_earlier_run_used():
    assert EvalSettings() == EvalSettings(preset="synthetic")
    assert (EvalSettings().max_new_tokens, EvalSettings().verbmem_max_new_tokens) == (8, 48)
    assert EvalSettings().qa_rouge == "recall" and not EvalSettings().rouge_stemmer and not EvalSettings().few_shot
    assert EvalSettings().mcq_format == "cloze" and EvalSettings().prompt_template == "plain"
    assert EvalSettings().stop_strings == ("\n\n", "\nQuestion", "Question:")
    assert load_settings().eval == EvalSettings()
    for field, value in SYNTHETIC_VALUES.items():
        assert EvalSettings.model_fields[field].default == value, field


@pytest.mark.parametrize("name", sorted(EVAL_PRESETS))
def test_every_preset_is_valid_and_documented(name):
    settings = EvalSettings(preset=name)
    assert {field: getattr(settings, field) for field in EVAL_PRESETS[name].values} == EVAL_PRESETS[name].values
    assert EVAL_PRESETS[name].source in describe_eval(settings)


def test_the_benchmark_selects_its_preset_and_the_recipe_overrides_it_field_by_field(tmp_path):
    assert {name: load_settings(None, {"benchmark": name}).eval.preset for name in ("tofu", "muse", "wmdp")} == {
        "tofu": "tofu",
        "muse": "muse",
        "wmdp": "wmdp",
    }
    recipe = tmp_path / "tofu.yaml"
    recipe.write_text("benchmark: tofu\neval: {max_new_tokens: 64, prompt_template: llama2-chat}\n", encoding="utf-8")
    settings = load_settings(recipe).eval
    assert (settings.preset, settings.max_new_tokens, settings.prompt_template) == ("tofu", 64, "llama2-chat")
    assert settings.rouge_stemmer and settings.stop_strings == () and settings.tofu_eval_size == 300  # the preset's
    # batch_size=64 is tofu-tiny.yaml's, the base layer of a TOFU run without a model
    assert "overrides: batch_size=64, max_new_tokens=64, prompt_template='llama2-chat'" in describe_eval(settings)
    recipe.write_text("benchmark: tofu\neval: {preset: tofu-openunlearning, batch_size: 4}\n", encoding="utf-8")
    settings = load_settings(recipe).eval
    assert (settings.tofu_eval_size, settings.tofu_max_new_tokens, settings.batch_size) == (400, 200, 4)
    assert load_settings(None, {"benchmark": "wmdp", "eval": {"mcq_format": "cloze"}}).eval.mcq_format == "cloze"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"preset": "tofu2"}, "eval.preset: unknown evaluation preset 'tofu2'; accepted: muse, synthetic, tofu"),
        ({"prompt_template": "llama3"}, "unknown prompt template 'llama3'; accepted: chat-template, llama2-chat"),
        ({"mcq_format": "letter"}, "eval.mcq_format"),
    ],
)
def test_bad_eval_settings_are_one_line_errors(section, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_settings(None, {"benchmark": "tofu", "eval": section})


def test_prompt_templates_put_the_question_in_the_models_own_format(monkeypatch, mcq_model):
    benchmark = Benchmark("tofu", "1", {"forget_qa": [QA("Who is she?", "A writer")]})
    _, generation = scored_answers(
        monkeypatch,
        "A writer",
        benchmark,
        EvalSettings(preset="tofu", prompt_template="llama2-chat"),
        "forget_qa_rouge",
    )
    assert generation.prompts == ["[INST] Who is she? [/INST]"]
    assert PROMPT_TEMPLATES["llama2-chat"].completion("A writer") == " A writer"
    assert (
        PROMPT_TEMPLATES["phi"].prompt("Who?") + PROMPT_TEMPLATES["phi"].completion("Me")
        == "Question: Who?\nAnswer: Me"
    )

    tokenizer = copy.deepcopy(mcq_model[1])
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}<user> {{ m['content'] }}{% endfor %}<bot>"
    settings = EvalSettings(preset="tofu", prompt_template="chat-template")
    generation = RecordedGeneration("A writer")
    monkeypatch.setattr("robustunlearn.metrics.qa.generate_greedy", generation)
    evaluate_model(None, tokenizer, benchmark, settings, metrics=("forget_qa_rouge",))
    assert generation.prompts == ["<user> Who is she?<bot>"]  # bos is a token id the metrics add themselves
    with pytest.raises(ValueError, match="needs a tokenizer that has a chat template"):
        evaluate_model(None, mcq_model[1], benchmark, settings, metrics=("forget_qa_rouge",))


def test_letter_prompt_is_lm_evals_wmdp_prompt():
    assert mcq_letter_prompt("  Which one? ", ["x", "y", "z", "w"]) == "Which one?\nA. x\nB. y\nC. z\nD. w\nAnswer:"


def write_letter_task(root, questions_file) -> None:
    """lm-eval's ``wmdp_*`` task (lm_eval/tasks/wmdp/_default_template_yaml) over local questions."""
    task = {
        "task": LETTER_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(questions_file)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\n"
        "D. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    root.mkdir()
    (root / f"{LETTER_TASK}.yaml").write_text(json.dumps(task, indent=2), encoding="utf-8")  # JSON is YAML


@needs_lm_eval
def test_wmdp_preset_scores_letters_as_lm_eval_does(wmdp_task_dir, mcq_model, tmp_path):
    model, tokenizer = mcq_model
    benchmark = load_wmdp(wmdp_task_dir, subsets=["bio"], corpora=False)
    records = benchmark.require("forget_mcq")
    ours = mcq_accuracy(model, tokenizer, records, mcq_format="letters", batch_size=4)
    write_letter_task(tmp_path / "tasks", wmdp_task_dir / "wmdp-bio.jsonl")

    results = run_lm_eval(
        model, tokenizer, [LETTER_TASK], include_path=tmp_path / "tasks", batch_size=4, log_samples=True
    )

    samples = sorted(results["samples"][LETTER_TASK], key=lambda sample: sample["doc_id"])
    theirs = [[response[0][0] for response in sample["resps"]] for sample in samples]
    assert len(theirs) == len(WMDP_QUESTIONS)
    for our_lls, their_lls in zip(ours["loglikelihoods"], theirs):
        assert their_lls == pytest.approx(our_lls, abs=1e-4)
    assert results["results"][LETTER_TASK]["acc,none"] == pytest.approx(ours["acc"])
    assert ours["acc_norm"] == ours["acc"]  # every letter is one character long
    preset = evaluate_model(model, tokenizer, benchmark, EvalSettings(preset="wmdp"), metrics=("forget_mcq_accuracy",))
    assert preset["forget_mcq_accuracy"] == pytest.approx(ours["acc"])
    cloze = mcq_accuracy(model, tokenizer, records, batch_size=4)
    assert cloze["loglikelihoods"] != ours["loglikelihoods"]  # the cloze variant stays, under its own name


def test_tofu_preset_sets_the_evaluation_size_and_generation_of_tofus_sets(monkeypatch):
    records = [QA(f"Question {i}?", "An answer.", perturbed_answers=("A wrong answer.",)) for i in range(400)]
    sets = {"forget": records, "retain": records}
    calls = {}

    def recorded_eval_set(model, tokenizer, records, *, forget, **options):
        calls["forget" if forget else "retain"] = (len(records), options)
        return {"forget": forget, "prob": 0.5, "rouge": 0.5, "truth_ratio": 0.5, "truth_ratios": [1.0] * len(records)}

    monkeypatch.setattr("robustunlearn.metrics.suite.tofu_eval_sets", lambda benchmark: sets)
    monkeypatch.setattr("robustunlearn.metrics.suite.tofu_eval_set", recorded_eval_set)
    benchmark = Benchmark("tofu", "1", {"forget_qa": records})
    for preset, size in (("tofu", 300), ("tofu-openunlearning", 400)):
        assert tofu_scores(None, None, benchmark, EvalSettings(preset=preset))["model_utility"] == pytest.approx(0.5)
        assert calls["forget"][0] == calls["retain"][0] == size
        options = calls["forget"][1]
        assert (options["max_new_tokens"], options["stop_strings"], options["template"].name) == (200, (), "plain")
    tofu_scores(None, None, benchmark, EvalSettings(preset="tofu", max_examples=16))
    assert calls["forget"][0] == 16


def test_tofu_probabilities_and_answers_use_the_prompt_template(monkeypatch):
    scored = []

    def recorded_scores(model, tokenizer, prompts, completions, **options):
        scored.extend(zip(prompts, completions))
        return [SimpleNamespace(nll=1.0) for _ in prompts]

    generation = RecordedGeneration("A writer.\n\nQuestion: more")
    monkeypatch.setattr("robustunlearn.metrics.tofu.completion_scores", recorded_scores)
    monkeypatch.setattr("robustunlearn.metrics.qa.generate_greedy", generation)
    record = QA("Who is she?", "A writer.", perturbed_answers=("A cook.",))
    template = PROMPT_TEMPLATES["llama2-chat"]
    result = tofu_eval_set(None, None, [record], forget=True, template=template, stop_strings=(), max_new_tokens=200)
    prompt = "[INST] Who is she? [/INST]"
    assert scored == [
        (prompt, " A writer."),
        (prompt, " A writer."),
        (prompt, " A cook."),
    ]  # answer, paraphrase, perturbed
    assert generation.prompts == ["[INST] Who is she? [/INST]"] and generation.max_new_tokens == [200]
    assert result["answers"] == ["A writer.\n\nQuestion: more"]  # TOFU cuts nothing
