"""``llm-ray compress``: model changes that make a model folder smaller or faster, each judged
by held-out perplexity, next-token accuracy and tokens/s against the original in the same run.

Stored-weight quantization (int8 per row, int8 with int8 activations, int4 per group, bf16 /
fp16: ``models/quant.py``) and quantization-aware training; FFN channel and attention-head
pruning that shrink the matrices (``prune.py``, ``heads.py``) and unstructured pruning
(magnitude, Wanda, N:M); distillation into a shallower or narrower student (``distill.py``);
``llm-ray compress sweep``, a Ray Tune grid over all of them with its Pareto front (``sweep.py``).
"""
