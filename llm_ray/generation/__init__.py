"""Text generation for ``DecoderLM``: greedy, sampling, beam search, stop rules, chat templates.

    config.py    SamplingParams (per row) and GenerationConfig (+ beam search), validated
    logits.py    select_next_tokens: the per-row step (repetition penalty, temperature, top-k/p)
    sampling.py  the greedy / sampling loop over a batch with the KV cache
    beam.py      beam search (length penalty, early stopping), HF-compatible
    stopping.py  stop strings and stop token ids
    chat.py      chat templates rendered with jinja2 as transformers does
    api.py       generate(bundle, prompts_or_messages, config) -> list of results

Importing this package does not import torch (the CLI validates settings first); the
submodules that need it import it themselves.
"""

from llm_ray.generation.config import GenerationConfig, SamplingParams

__all__ = ["GenerationConfig", "SamplingParams"]
