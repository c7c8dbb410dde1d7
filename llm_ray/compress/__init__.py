"""``llm-ray compress``: model changes that make a model folder smaller or faster, each judged
by held-out perplexity and tokens/s against the original in the same run.

Built: stored-weight quantization (int8 per row, int4 per group, bf16 / fp16 casts:
``models/quant.py``), written as a model folder every later stage loads (``load_bundle``
dequantizes it); FFN channel pruning that shrinks the matrices and unstructured pruning
(magnitude, Wanda, N:M) in ``prune.py``. Head pruning, distillation and the Ray Tune sweep are
issue 13's next parts.
"""
