"""robustunlearn plan: parameter counts from the config against real models, the activation
formula against the tensors autograd saves, the objectives' forward passes, and the command."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from helpers import cli_result
from robustunlearn.bench.objectives import random_unlearn_batch
from robustunlearn.core.models import TinyModelConfig
from robustunlearn.objectives import OBJECTIVES, build_objective
from robustunlearn.train.plan import (
    PlanSettings,
    activation_bytes,
    load_config,
    model_shape,
    parse_memory,
    plan_memory,
)

LLAMA_7B = Path(__file__).parent / "fixtures" / "llama-2-7b" / "config.json"


def _config(kv_heads: int = 4, tie: bool = False, attention: str | None = None) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        tie_word_embeddings=tie,
        attn_implementation=attention,
    )


@pytest.mark.parametrize("kv_heads, tie", [(4, False), (2, True)])
def test_parameter_count_is_the_real_models(kv_heads, tie):
    config = _config(kv_heads, tie)
    real = LlamaForCausalLM(config)
    plan = plan_memory(config, PlanSettings(optimizers=("adam",)))
    assert plan.parameters == plan.trainable == sum(p.numel() for p in real.parameters())


def test_llama_2_7b_config_counts_its_known_parameters():
    plan = plan_memory(load_config(str(LLAMA_7B)), PlanSettings(optimizers=("adam",)))
    assert plan.parameters == 6_738_415_616  # Llama-2-7b: 32 blocks of 202,383,360 + 2 x 131,072,000 + 4,096


def test_lora_and_rmu_train_what_peft_and_the_objective_train():
    peft = pytest.importorskip("peft")
    config = _config()
    model = peft.get_peft_model(
        LlamaForCausalLM(config),
        peft.LoraConfig(
            r=4, target_modules=["q_proj", "v_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        ),
    )
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan_memory(config, PlanSettings(lora_rank=4, optimizers=("adam",))).trainable == adapters
    rmu = build_objective("rmu", model=LlamaForCausalLM(config))
    down_projs = sum(p.numel() for p in rmu.trainable_parameters(LlamaForCausalLM(config)))
    assert plan_memory(config, PlanSettings(objective="rmu", optimizers=("adam",))).trainable == down_projs


@pytest.mark.parametrize(("name", "options"), [(name, {}) for name in sorted(OBJECTIVES)] + [("idk", {"mode": "dpo"})])
def test_forward_passes_per_loss(name, options):
    """An objective's forward_passes counts the model calls of one evaluation of its loss."""
    config = _config()
    model = LlamaForCausalLM(config)
    objective = build_objective(name, model=model, **options)
    batch = random_unlearn_batch(objective.batch_parts, (2, 8), 96, torch.device("cpu"))
    reference = objective.reference_outputs(model, batch) if objective.needs_reference else {}
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    objective.loss(model, batch, reference)
    assert len(calls) == objective.forward_passes


def _saved_bytes(model, loss) -> int:
    """Bytes of the distinct non-parameter storages autograd saves while ``loss()`` runs."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss()
    return sum(saved.values())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_activation_formula_counts_what_autograd_saves(attention):
    config = _config(attention=attention)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    objective = build_objective("ga", model=model)
    batch_size, length = 3, 16
    batch = random_unlearn_batch(objective.batch_parts, (batch_size, length), 96, torch.device("cpu"))
    measured = _saved_bytes(model, lambda: objective.loss(model, batch, {}))
    shape = model_shape(config, "ga", None)
    estimated = activation_bytes(shape, batch_size * length, 4, attention, length)
    assert abs(estimated / measured - 1) < 0.03


def test_parse_memory_units():
    assert parse_memory("80GB") == 80 * 10**9
    assert parse_memory("40 GiB") == 40 * 2**30
    assert parse_memory("141") == 141 * 10**9
    assert parse_memory("512MiB") == 512 * 2**20


def test_fsdp_shards_and_zeroth_order_holds_no_gradients():
    config = load_config(str(LLAMA_7B))
    one = plan_memory(config, PlanSettings(optimizers=("adam", "zo-sgd")))
    eight = plan_memory(config, PlanSettings(optimizers=("adam", "zo-sgd"), gpus=8, parallel="fsdp"))
    adam, zo = one.rows
    assert adam.gradients == adam.weights == 4 * 6_738_415_616 and adam.state == 2 * adam.gradients
    assert zo.gradients == zo.state == 0 and zo.fits and not adam.fits
    assert eight.rows[0].state == adam.state // 8 and eight.rows[0].fits
    assert one.reference == "cached" and adam.reference == 0


def test_mixed_precision_gathers_and_computes_in_bfloat16_over_float32_shards():
    config = load_config(str(LLAMA_7B))
    settings = PlanSettings(optimizers=("adam",), gpus=8, parallel="fsdp")
    plain = plan_memory(config, settings).rows[0]
    mixed = plan_memory(config, replace(settings, mixed_precision="bf16")).rows[0]
    parameters, block = 6_738_415_616, 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096  # Llama-2-7B
    outside = parameters - 32 * block  # embeddings, output head, final norm
    # float32 shards; the gathered outside modules and two blocks in bfloat16
    assert mixed.weights == parameters * 4 // 8 + (outside + 2 * block) * 2
    # float32 gradient shards, two gathered blocks' gradients in bfloat16, one block's float32 copy to reduce
    assert mixed.gradients == parameters * 4 // 8 + 2 * block * 2 + block * 4
    assert mixed.state == plain.state and mixed.activations < plain.activations
    one_gpu = replace(settings, gpus=1, mixed_precision="bf16")  # one process shards nothing: plain float32
    assert plan_memory(config, one_gpu).rows[0] == plan_memory(config, replace(one_gpu, mixed_precision=None)).rows[0]


def test_a_live_reference_holds_the_start_values_of_the_trained_weights_only():
    config = load_config(str(LLAMA_7B))
    full = plan_memory(config, PlanSettings(optimizers=("adam",), objective="npo", reference="live"))
    rmu = plan_memory(config, PlanSettings(optimizers=("adam",), objective="rmu"))
    assert full.reference == rmu.reference == "live"
    assert full.rows[0].reference == 4 * 6_738_415_616  # every weight trains: a copy of all
    down_proj = 3 * 4096 * 11008  # RMU trains three layers' down_proj (its defaults for 32 blocks)
    assert rmu.rows[0].reference == rmu.rows[0].state // 2 == 4 * down_proj


def _plan(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """``robustunlearn plan ARGS`` in this process: exit code, standard output, standard error."""
    monkeypatch.setenv("COLUMNS", "200")
    return cli_result(monkeypatch, capsys, "plan", *args)


def test_plan_command_prints_a_table_per_setup_and_json(monkeypatch, capsys):
    args = ("--model", str(LLAMA_7B), "--optimizer", "adam,zo-sgd", "--gpus", "1,8", "--parallel", "ddp,fsdp")
    code, out, err = _plan(monkeypatch, capsys, *args)
    assert code == 0, err
    summary = out[out.index("fits in 80.0 GB?") :]  # the summary's columns: one per setup
    assert summary.split("\n")[2].split()[1:] == ["1", "GPU", "8", "GPUs", "ddp", "8", "GPUs", "fsdp"]
    adam_one_gpu = next(line.split() for line in out.splitlines() if line.split()[:1] == ["adam"])
    # weights, gradients 27.0 GB each, state 53.9 GB; reference cached: 0 B; does not fit
    assert adam_one_gpu[2:8] == ["27.0", "GB", "27.0", "GB", "53.9", "GB"] and adam_one_gpu[-1] == "no"
    code, out, err = _plan(monkeypatch, capsys, "--optimizer", "zo-sgd", "--json", "--reference", "live")
    plans = json.loads(out)
    assert plans[0]["reference"] == "live" and plans[0]["rows"][0]["gradients"] == 0
    embedded = LlamaForCausalLM(TinyModelConfig().llama_config())
    assert plans[0]["parameters"] == sum(p.numel() for p in embedded.parameters())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-memory", "eighty"], "--gpu-memory 'eighty' is not a memory size"),
        (["--optimizer", "adamm"], "unknown optimizer 'adamm'"),
        (["--objective", "rmu", "--reference", "cached"], "cannot be cached"),
        (["--objective", "ga", "--reference", "live"], "uses no reference model"),
        (["--gpus", "3"], "must be a multiple of the 3 GPUs"),
        (["--parallel", "zero3", "--gpus", "2"], "unknown parallel mode 'zero3'"),
        (["--gpus", "2", "--mixed-precision", "bf16"], "add --parallel fsdp"),
        (["--gpus", "2", "--parallel", "fsdp", "--mixed-precision", "fp8"], "unknown mixed precision 'fp8'"),
        (["--parallel", "fsdp", "--gpus", "2", "--mixed-precision", "bf16", "--dtype", "bfloat16"], "--dtype float32"),
        (["--model", "meta-llama/Llama-2-7b-hf"], "HF_HUB_OFFLINE is set"),
        (["--model", "./missing"], "does not exist"),
    ],
)
def test_plan_user_errors_are_one_line_with_exit_code_2(args, message, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    code, out, err = _plan(monkeypatch, capsys, *args)
    assert code == 2 and message in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error:")
