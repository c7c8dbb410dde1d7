"""Greedy decoding for ``DecoderLM``, with or without the KV cache."""

from __future__ import annotations

from typing import Optional

import torch

from llm_ray.models.kv_cache import KVCache


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
    B, T = input_ids.shape
    cfg = model.cfg
    if cfg.positions == "learned" and T + max_new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(
            f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceeds model.max_seq_len "
            f"({cfg.max_seq_len}) of the learned position table"
        )
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            out = input_ids
            mask = attention_mask.bool() if attention_mask is not None else None
            cache = KVCache(len(model.layers)) if use_cache else None
            finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
            step_input = input_ids  # with the cache only the new tokens are fed
            for _ in range(max_new_tokens):
                if use_cache:
                    logits = model(step_input, attention_mask=mask, kv_cache=cache)
                else:
                    logits = model(out, attention_mask=mask)
                next_tok = logits[:, -1].argmax(dim=-1)  # (B,)
                if eos_id is not None:
                    next_tok = torch.where(finished, torch.full_like(next_tok, eos_id), next_tok)
                    finished |= next_tok == eos_id
                out = torch.cat([out, next_tok.unsqueeze(1)], dim=1)  # (B, T + i + 1)
                if mask is not None:
                    mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                step_input = next_tok.unsqueeze(1)  # (B, 1)
                if eos_id is not None and bool(finished.all()):
                    break
    finally:
        model.train(was_training)
    return out
