"""Weight quantization as an attack on an unlearned model.

Zhang et al. (2025, "Catastrophic failure of LLM unlearning via quantization") showed that
quantizing an unlearned model can bring the forgotten knowledge back: unlearning moves weights
by less than a quantization step, so the unlearned and the original weights round to the same
codes ("same bucket"). :func:`~robustunlearn.attacks.quant.quantize.quantize_model` applies a quantizer
and :func:`~robustunlearn.attacks.quant.quantize.code_agreement` measures how many codes the unlearning
actually changed.

Which weights: like weight-only quantization libraries (GPTQ, AWQ, bitsandbytes' ``load_in_4bit``)
we quantize the weights of the ``nn.Linear`` layers inside the transformer blocks (attention
q/k/v/o, MLP gate/up/down). Embeddings, norms and biases stay in full precision, and so does the
output head unless ``include_lm_head=True`` (with tied embeddings the input embedding shares that
weight and is quantized with it).

The returned model is a plain model whose weights are the *dequantized* values (in the weight's
dtype), so every metric runs on it unchanged; the arithmetic is done in float32 (float64 for
float64 weights).

Methods (``QUANTIZATION_METHODS``; case and ``_`` vs ``-`` are ignored, aliases in ``ALIASES``):

* ``rtn-int8``: symmetric round-to-nearest, one scale per output channel (:func:`rtn_symmetric`).
* ``rtn-int{2..7}``: asymmetric round-to-nearest, scale and zero point per group of
  ``group_size`` input columns (:func:`rtn_groupwise`).
* ``nf4``, ``fp4``: bitsandbytes' 4-bit code books emulated in torch (:func:`quantize_code_book`).
* ``gptq-int{2..8}``: GPTQ with error compensation, calibrated on the caller's text
  (:mod:`robustunlearn.attacks.quant.gptq`).
* library backends, used when installed: ``quanto-int{2,4,8}`` (optimum-quanto),
  ``hqq-int{1,2,3,4,8}`` (HQQ), ``torchao-int8``, ``bnb-nf4``/``bnb-fp4``/``bnb-int8``
  (bitsandbytes). Each quantizes one weight at a time and we keep its dequantized weight.

Modules, each importing only those before it: :mod:`.core` (method names, the result type, shared
helpers, which weights), :mod:`.rtn` (round-to-nearest and the code books), :mod:`.gptq`,
:mod:`.backends` (the libraries) and :mod:`.quantize` (whole models: :func:`quantize_model`,
:func:`code_agreement`, the quantization attacks of the registry).
"""
