import math

import pytest
import torch
from scipy.stats import hmean, ks_2samp
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from robustunlearn.bench.generation import bench_generation
from robustunlearn.data.base import QA, Continuation, MultipleChoice, Passage
from robustunlearn.data.prompts import qa_completion, qa_prompt
from robustunlearn.metrics import (
    completion_logprobs,
    completion_scores,
    contains_answer,
    cut_to_tokens,
    forget_quality,
    generate_greedy,
    knowmem,
    mcq_accuracy,
    mcq_from_loglikelihoods,
    mia_aucs,
    mia_suite,
    min_k,
    min_k_plus_plus,
    model_utility,
    next_token_stats,
    perplexity,
    privleak,
    qa_accuracy,
    rouge_l,
    tofu_eval_set,
    truth_ratio,
    truth_ratio_stat,
    verbmem,
)
from robustunlearn.metrics.muse import verbmem_from_generations

ALICE = QA("Where was Alice Moreau born?", "Paris", paraphrased_answer="Paris", perturbed_answers=("London", "Rome"))
BRUNO = QA("What does Bruno Tanaka write?", "poems", perturbed_answers=("novels", "plays"))
LIGHTHOUSE = Passage("The old lighthouse keeper counted seven ships before dawn.")
UNSEEN_QA = QA("Where was Chiara Okafor born?", "Lagos")
UNSEEN_PASSAGE = Passage("A green parrot sang loudly over the quiet market square.")
CORPUS = [
    qa_prompt(ALICE.question) + qa_completion(ALICE.answer),
    qa_prompt(BRUNO.question) + qa_completion(BRUNO.answer),
    LIGHTHOUSE.text,
    UNSEEN_PASSAGE.text,
    "London Rome novels plays Lagos Chiara Okafor one two three four five",
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


@pytest.fixture(scope="module")
def random_model(tokenizer, tiny_llama):
    return tiny_llama(1, vocab_size=len(tokenizer), max_positions=128, dtype=torch.float64)


@pytest.fixture(scope="module")
def trained_model(tokenizer, tiny_llama):
    """A tiny Llama that has memorised ALICE, BRUNO and LIGHTHOUSE (prompt unscored, eos scored)."""
    model = tiny_llama(0, vocab_size=len(tokenizer), max_positions=128)
    examples = [(qa_prompt(r.question), qa_completion(r.answer)) for r in (ALICE, BRUNO)] + [("", LIGHTHOUSE.text)]
    rows, labels = [], []
    for prompt, completion in examples:
        prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
        target = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
        rows.append(prompt_ids + target)
        labels.append([-100] * len(prompt_ids) + target)
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    label_ids = torch.tensor([r + [-100] * (width - len(r)) for r in labels])
    mask = (torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=label_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    return model


# --- generation ---------------------------------------------------------------------------


def manual_greedy(model, tokenizer, prompt, max_new_tokens):
    """Reference decoding: one sequence, full forward pass per token, no cache, no padding."""
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    new = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax().item()
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
    return tokenizer.decode(new, skip_special_tokens=True)


def test_batched_greedy_equals_one_at_a_time(random_model, tokenizer):
    prompts = [
        "The old",
        "",
        "Where was Alice Moreau born? One two three four",
        "poems",
        "A green parrot sang",
    ]
    batched = generate_greedy(random_model, tokenizer, prompts, max_new_tokens=6, batch_size=3)
    single = generate_greedy(random_model, tokenizer, prompts, max_new_tokens=6, batch_size=1)
    assert batched == single
    assert batched == [manual_greedy(random_model, tokenizer, p, 6) for p in prompts]
    assert len(set(batched)) > 1


def test_greedy_stops_at_eos_and_restores_mode(trained_model, tokenizer):
    trained_model.train()
    trained_model.model.layers[0].eval()
    answers = generate_greedy(trained_model, tokenizer, [qa_prompt(ALICE.question), qa_prompt(BRUNO.question)], 20)
    assert answers == [" Paris", " poems"]
    assert trained_model.training and trained_model.model.layers[1].training
    assert not trained_model.model.layers[0].training
    trained_model.eval()


def test_generation_rejects_bad_arguments(random_model, tokenizer):
    with pytest.raises(ValueError, match="batch_size"):
        generate_greedy(random_model, tokenizer, ["a"], 3, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_greedy(random_model, tokenizer, ["a"], 0)


def test_bench_generation_reports_identical_outputs(random_model, tokenizer, capsys):
    result = bench_generation(random_model, tokenizer, n_prompts=4, batch_size=4, max_new_tokens=3)
    assert result["identical"] and result["batched_s"] > 0 and result["sequential_s"] > 0
    assert result["cache_speedup"] == pytest.approx(result["dynamic_cache_s"] / result["batched_s"])
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "dynamic KV cache" in printed


# --- ROUGE, VerbMem, KnowMem, QA accuracy --------------------------------------------------


def test_rouge_l_hand_computed():
    # LCS("the cat sat on the mat", "the cat on a mat") = "the cat on mat": 4 words.
    score = rouge_l("the cat sat on the mat", "The cat, on a mat!")
    assert score.precision == pytest.approx(4 / 5)
    assert score.recall == pytest.approx(4 / 6)
    assert score.f1 == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))


def test_verbmem_cuts_reference_to_generation_budget(tokenizer):
    text = " one two three four five"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids[:3]) == " one two three"  # one token per word here
    assert cut_to_tokens(tokenizer, text, 3) == " one two three"
    assert cut_to_tokens(tokenizer, text, 50) == text
    record = Continuation(prefix="count:", continuation=text)
    cut = verbmem_from_generations(tokenizer, ["one two three"], [record], max_new_tokens=3)
    assert cut["scores"] == [pytest.approx(1.0)]
    uncut = verbmem_from_generations(tokenizer, ["one two three"], [record], max_new_tokens=50)
    assert uncut["scores"] == [pytest.approx(2 * 1.0 * 0.6 / 1.6)]  # P = 3/3, R = 3/5


def test_verbmem_of_a_memorised_passage(trained_model, random_model, tokenizer):
    record = Continuation(prefix="The old lighthouse keeper", continuation=" counted seven ships before dawn.")
    assert verbmem(trained_model, tokenizer, [record], max_new_tokens=16)["mean"] == pytest.approx(1.0)
    assert verbmem(random_model, tokenizer, [record], max_new_tokens=16)["mean"] < 0.5


def test_knowmem_and_qa_accuracy(trained_model, tokenizer):
    wrong = QA(ALICE.question, "Lisbon")
    result = knowmem(trained_model, tokenizer, [ALICE, BRUNO, wrong], few_shot=[BRUNO])
    assert result["answers"] == ["Paris", "poems", "Paris"]
    assert result["scores"] == [1.0, 1.0, 0.0]
    accuracy = qa_accuracy(trained_model, tokenizer, [ALICE, BRUNO, wrong])
    assert accuracy["correct"] == [True, True, False]
    assert accuracy["accuracy"] == pytest.approx(2 / 3)


def test_contains_answer_normalises_and_respects_word_boundaries():
    assert contains_answer("She was born in PARIS, France.", "paris")
    assert contains_answer("born in 1990 ", "1990.")
    assert not contains_answer("born in 1990", "199")
    with pytest.raises(ValueError, match="empty"):
        contains_answer("anything", " ?! ")


# --- likelihoods and multiple choice ---------------------------------------------------------


def test_completion_logprobs_match_a_manual_forward_pass(random_model, tokenizer):
    prompts = ["Where was Alice Moreau born?", "", "The old"]
    completions = [" Paris", "A green parrot sang", " lighthouse keeper counted"]
    batched = completion_scores(
        random_model, tokenizer, prompts, completions, add_eos=True, distribution_stats=True, batch_size=2
    )
    for prompt, completion, scores in zip(prompts, completions, batched):
        prompt_ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
        target = [*tokenizer.encode(completion, add_special_tokens=False), tokenizer.eos_token_id]
        with torch.no_grad():
            log_probs = random_model(input_ids=torch.tensor([prompt_ids + target])).logits[0].log_softmax(-1)
        expected = log_probs[len(prompt_ids) - 1 : -1]
        assert torch.allclose(scores.logprobs, expected.gather(-1, torch.tensor(target)[:, None])[:, 0], atol=1e-10)
        mean, std = next_token_stats(expected)
        assert torch.allclose(scores.mean, mean, atol=1e-10) and torch.allclose(scores.std, std, atol=1e-10)
    without_eos = completion_logprobs(random_model, tokenizer, prompts, completions, batch_size=1)
    for with_eos, plain in zip(batched, without_eos):
        assert torch.allclose(with_eos.logprobs[:-1], plain, atol=1e-10)


def test_mcq_picks_the_trained_answer(trained_model, tokenizer):
    right = MultipleChoice(ALICE.question, ("London", "Paris", "Rome"), answer_index=1)
    wrong = MultipleChoice(ALICE.question, ("Paris", "London"), answer_index=1)
    result = mcq_accuracy(trained_model, tokenizer, [right, wrong], batch_size=2)
    assert result["predictions"] == [1, 0]
    assert result["acc"] == pytest.approx(0.5)


def test_mcq_length_normalisation_hand_built():
    record = MultipleChoice("q", ("a", "a much longer option"), answer_index=1)
    # acc: -4 > -5 picks option 0; acc_norm: -4/len("a") = -4 < -5/len("a much longer option") = -0.25.
    result = mcq_from_loglikelihoods([[-4.0, -5.0]], [record])
    assert result["predictions"] == [0] and result["predictions_norm"] == [1]
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_mcq_length_normalisation_counts_the_choice_without_its_leading_space():
    # lm-eval divides by len(choice): -2/1 < -5/3 picks "abc"; counting the scored " " too would
    # give -2/2 > -5/4 and pick "a".
    record = MultipleChoice("q", ("a", "abc"), answer_index=1)
    assert mcq_from_loglikelihoods([[-2.0, -5.0]], [record])["predictions_norm"] == [1]


# --- membership inference and PrivLeak --------------------------------------------------------


def test_min_k_on_known_logprobs():
    logprobs = torch.tensor([-1.0, -3.0, -5.0, -2.0, -4.0])
    assert min_k(logprobs, 0.4) == pytest.approx(-4.5)
    assert min_k(logprobs, 0.1) == pytest.approx(-5.0)  # never fewer than one token
    assert min_k(logprobs, 1.0) == pytest.approx(-3.0)
    with pytest.raises(ValueError, match="k must be"):
        min_k(logprobs, 0.0)


def test_min_k_plus_plus_on_a_hand_computed_distribution():
    log_p = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64).log()
    mean, std = next_token_stats(log_p)
    # mu = 0.5 ln 0.5 + 0.5 ln 0.25 = -1.5 ln 2; E[(log p)^2] = 0.5 (ln 2)^2 + 0.5 (2 ln 2)^2 = 2.5 (ln 2)^2.
    ln2 = math.log(2)
    assert mean.item() == pytest.approx(-1.5 * ln2)
    assert std.item() == pytest.approx(math.sqrt(2.5 * ln2**2 - 2.25 * ln2**2))  # = ln 2 / 2
    # Tokens with p = 0.5 and p = 0.25 standardise to +1 and -1.
    logprobs = torch.stack([log_p[0], log_p[1]])
    assert min_k_plus_plus(logprobs, mean.repeat(2), std.repeat(2), k=1.0) == pytest.approx(0.0)
    assert min_k_plus_plus(logprobs, mean.repeat(2), std.repeat(2), k=0.5) == pytest.approx(-1.0)


def test_mia_auc_orientation():
    members = {"loss": [1.0, 3.0], "min_k": [-1.0, -3.0]}
    nonmembers = {"loss": [2.0, 4.0], "min_k": [-2.0, -4.0]}
    aucs = mia_aucs(members, nonmembers)
    assert aucs == {"auc_loss": pytest.approx(0.75), "auc_min_k": pytest.approx(0.75)}
    assert mia_aucs({"loss": [5.0]}, {"loss": [1.0]})["auc_loss"] == 0.0


def test_mia_suite_detects_trained_members(trained_model, tokenizer):
    aucs = mia_suite(trained_model, tokenizer, [LIGHTHOUSE, ALICE], [UNSEEN_PASSAGE, UNSEEN_QA])
    assert set(aucs) == {"auc_loss", "auc_zlib", "auc_min_k", "auc_min_k_plus_plus"}
    assert aucs["auc_loss"] == 1.0 and aucs["auc_min_k"] == 1.0


def test_privleak_sign_convention():
    assert privleak(0.999, 0.5) == pytest.approx(-99.8)  # original model: forget still detected
    assert privleak(0.5, 0.5) == 0.0
    assert privleak(0.3, 0.5) == pytest.approx(40.0)  # over-unlearned: forget looks unfamiliar
    with pytest.raises(ValueError, match="auc_model"):
        privleak(1.5, 0.5)


# --- TOFU -------------------------------------------------------------------------------------


def test_truth_ratio_and_its_statistics():
    assert truth_ratio(1.0, [2.0, 3.0]) == pytest.approx(math.exp(-1.5))
    assert truth_ratio_stat([2.0, 0.5], forget=True) == pytest.approx(0.5)
    assert truth_ratio_stat([0.25, 2.0], forget=False) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="perturbed"):
        truth_ratio(1.0, [])


def test_forget_quality_is_the_ks_p_value():
    a, b = [0.1, 0.4, 0.35, 0.8, 0.9, 1.2], [0.5, 0.55, 1.1, 1.3, 1.4, 2.0, 2.2]
    assert forget_quality(a, b) == pytest.approx(ks_2samp(a, b).pvalue)
    assert forget_quality(a, list(a)) == pytest.approx(1.0)


def test_model_utility_is_the_harmonic_mean_of_present_sets():
    retain = {"forget": False, "prob": 0.9, "rouge": 0.8, "truth_ratio": 0.5}
    authors = {"forget": False, "prob": 0.4, "rouge": 0.7, "truth_ratio": 0.6}
    facts = {"forget": False, "prob": 0.5, "rouge": 0.9, "truth_ratio": 0.55}
    all_nine = [0.9, 0.8, 0.5, 0.4, 0.7, 0.6, 0.5, 0.9, 0.55]
    assert model_utility({"retain": retain, "real_authors": authors, "world_facts": facts}) == pytest.approx(
        hmean(all_nine)
    )
    assert model_utility({"retain": retain, "real_authors": authors}) == pytest.approx(hmean(all_nine[:6]))
    assert model_utility({"retain": {**retain, "rouge": 0.0}}) == 0.0
    with pytest.raises(ValueError, match="forget"):
        model_utility({"forget": {**retain, "forget": True}})


def test_tofu_eval_set_on_a_trained_model(trained_model, tokenizer):
    result = tofu_eval_set(trained_model, tokenizer, [ALICE, BRUNO], forget=False)
    answer_lp = completion_logprobs(trained_model, tokenizer, [qa_prompt(ALICE.question)], [" Paris"], add_eos=True)[0]
    assert result["probs"][0] == pytest.approx(answer_lp.mean().exp().item())
    assert result["rouges"] == [1.0, 1.0]
    assert all(r < 0.1 for r in result["truth_ratios"])  # the truth is far likelier than the perturbations
    assert result["truth_ratio"] == pytest.approx(sum(1 - r for r in result["truth_ratios"]) / 2)

    normalised = tofu_eval_set(trained_model, tokenizer, [ALICE], forget=True, normalise_prob=True)
    perturbed = completion_logprobs(
        trained_model, tokenizer, [qa_prompt(ALICE.question)] * 2, [" London", " Rome"], add_eos=True
    )
    p_true = answer_lp.mean().exp().item()
    expected = p_true / (p_true + sum(lp.mean().exp().item() for lp in perturbed))
    assert normalised["prob"] == pytest.approx(expected)
    assert normalised["truth_ratio"] == pytest.approx(normalised["truth_ratios"][0])  # min(R, 1/R) = R < 1


def test_tofu_needs_perturbed_answers(trained_model, tokenizer):
    with pytest.raises(ValueError, match="perturbed_answers"):
        tofu_eval_set(trained_model, tokenizer, [UNSEEN_QA], forget=True)


# --- perplexity -------------------------------------------------------------------------------


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tokenizer, tiny_llama):
    model = tiny_llama(vocab_size=len(tokenizer), max_positions=128, dtype=torch.float64)
    torch.nn.init.zeros_(model.lm_head.weight)  # logits 0 everywhere: uniform next-token distribution
    assert perplexity(model, tokenizer, [LIGHTHOUSE, UNSEEN_PASSAGE], batch_size=1) == pytest.approx(len(tokenizer))


def test_perplexity_weights_passages_by_tokens(trained_model, tokenizer):
    both = perplexity(trained_model, tokenizer, [LIGHTHOUSE, UNSEEN_PASSAGE])
    logprobs = completion_logprobs(trained_model, tokenizer, ["", ""], [LIGHTHOUSE.text, UNSEEN_PASSAGE.text])
    expected = math.exp(-torch.cat(logprobs).mean().item())
    assert both == pytest.approx(expected)
    assert perplexity(trained_model, tokenizer, [UNSEEN_PASSAGE, LIGHTHOUSE], batch_size=1, progress=True) == (
        pytest.approx(both)
    )
    assert perplexity(trained_model, tokenizer, [LIGHTHOUSE]) < 1.1 < both
