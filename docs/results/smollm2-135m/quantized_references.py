"""The facts study's reference models under 4-bit and 3-bit quantization: does quantization keep the
fine-tuned facts where they were learned (the target), and add none where they were not (retrain)?

    OMP_NUM_THREADS=1 python docs/results/smollm2-135m/quantized_references.py CACHE_ENTRY BASE_MODEL

CACHE_ENTRY: the prepared entry the facts study used (``<cache-dir>/prepared/<key>/``); BASE_MODEL:
the converted SmolLM2 directory. Prints a line per model and method and writes
quantized_references.json beside this file.
"""

import json
import sys
from pathlib import Path

import torch

from robustunlearn.attacks.quant.quantize import quantize_model
from robustunlearn.config import load_settings
from robustunlearn.core.models import load_model
from robustunlearn.data.base import Benchmark
from robustunlearn.data.splits import retain_views
from robustunlearn.metrics.suite import evaluate_model

HERE = Path(__file__).parent
METRICS = ("forget_qa_rouge", "forget_mcq_accuracy", "retain_qa_rouge")

torch.set_num_threads(1)
entry, base_model = Path(sys.argv[1]), sys.argv[2]
settings = load_settings(HERE / "facts" / "recipe.yaml", {"base_model": base_model})
views = retain_views(Benchmark.load(entry / "benchmark.json"), settings.study.split_seed, settings.study.retain_shares)
scores = {}
for name in ("target", "retrain"):
    model, tokenizer = load_model(entry / name)
    for method in (None, "rtn-int4", "nf4", "rtn-int3"):
        quantized = model if method is None else quantize_model(model, method)[0]
        scores[f"{name}/{method or 'none'}"] = evaluate_model(
            quantized, tokenizer, views.evaluation, settings.eval, metrics=METRICS
        )
        print(name, method or "none", {k: round(v, 3) for k, v in scores[f"{name}/{method or 'none'}"].items()})
(HERE / "quantized_references.json").write_text(json.dumps(scores, indent=1) + "\n")
