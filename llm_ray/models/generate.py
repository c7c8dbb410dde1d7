"""Greedy decoding for ``DecoderLM``, with or without the KV cache.

A thin wrapper over ``llm_ray.generation.sampling.decode`` (which also samples, applies
repetition penalties and stop rules); kept for its tensor-in, tensor-out form.
"""

from __future__ import annotations

from typing import Optional

import torch


def greedy_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to each prompt; returns (B, T + new).

    Prompts of different lengths go left-padded with an ``attention_mask`` (B, T), 1 = real.
    A row that produced ``eos_id`` keeps receiving ``eos_id``; generation stops early once
    every row has. The model runs in eval mode (no dropout) and its mode is restored after.
    """
    # Imported here: llm_ray.generation imports llm_ray.models (no import cycle at load time).
    from llm_ray.generation.config import SamplingParams
    from llm_ray.generation.sampling import decode

    out = decode(
        model,
        input_ids,
        SamplingParams(max_new_tokens=max_new_tokens),
        attention_mask=attention_mask,
        eos_ids=[eos_id] if eos_id is not None else (),
        use_cache=use_cache,
    )
    width = max(len(t) for t in out.tokens)
    fill = eos_id if eos_id is not None else 0
    new = torch.full((input_ids.shape[0], width), fill, dtype=input_ids.dtype, device=input_ids.device)
    for i, toks in enumerate(out.tokens):
        new[i, : len(toks)] = torch.tensor(toks, dtype=input_ids.dtype)
    return torch.cat([input_ids, new], dim=1)  # (B, T + new)
