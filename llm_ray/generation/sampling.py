"""The token-by-token loop for greedy decoding and sampling over a static batch.

One prefill of the (left-padded) prompts, then one forward per new token. With the KV cache
only the new token goes through the model and the cache is preallocated to its final length;
without it the whole sequence is recomputed each step (the reference the cache must equal).
Each row picks its token with ``logits.select_next_tokens`` under its own ``SamplingParams``
and stops on its own: an eos / stop token id, a stop string (``stop_fn``) or its
``max_new_tokens``. The batch runs until every row has stopped. ``greedy_tokens`` is the
greedy loop in tensor-in, tensor-out form (ids (B, T) -> (B, T + new)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch

from llm_ray.generation.config import SamplingParams
from llm_ray.generation.logits import make_generators, select_next_tokens
from llm_ray.models.kv_cache import KVCache

# stop_fn(row, generated ids so far) -> True when a stop string has appeared (see stopping.py)
StopFn = Callable[[int, list[int]], bool]


@dataclass
class DecodeOutput:
    """Per row: generated ids (a final eos / stop token id included) and why the row ended."""

    tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (eos, stop token id or stop string) | "length"
    prompt_lens: list[int] = field(default_factory=list)


def check_length(model: torch.nn.Module, prompt_len: int, max_new_tokens: int) -> None:
    """A learned position table cannot go past ``max_seq_len``; RoPE and sinusoids can."""
    cfg = model.cfg
    if cfg.positions == "learned" and prompt_len + max_new_tokens - 1 > cfg.max_seq_len:
        raise ValueError(
            f"max_new_tokens: prompt ({prompt_len}) + max_new_tokens ({max_new_tokens}) exceeds "
            f"model.max_seq_len ({cfg.max_seq_len}) of the learned position table"
        )


def decode(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    attention_mask: Optional[torch.Tensor] = None,
    eos_ids: Sequence[int] = (),
    use_cache: bool = True,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    stop_fn: Optional[StopFn] = None,
) -> DecodeOutput:
    """Generate for a batch of prompts, input_ids (B, T) left-padded with attention_mask (B, T).

    ``generators`` default to one per row seeded from the row's ``seed`` (None = global RNG).
    """
    B, T = input_ids.shape
    dev = input_ids.device
    params = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(params) != B:
        raise ValueError(f"params: got {len(params)} SamplingParams for {B} prompts")
    max_new = max(p.max_new_tokens for p in params)
    check_length(model, T, max_new)
    if generators is None:
        generators = make_generators(params, dev)
    stop_ids = [set(eos_ids) | set(p.stop_token_ids) for p in params]

    mask = attention_mask.bool().to(dev) if attention_mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None  # no padding: the mask-free SDPA paths are faster
    # All tokens so far, (B, T + max_new): the uncached path's input and the penalty's history.
    seq = torch.zeros(B, T + max_new, dtype=torch.long, device=dev)
    seq[:, :T] = input_ids
    seq_mask = torch.ones(B, T + max_new, dtype=torch.bool, device=dev)
    if mask is not None:
        seq_mask[:, :T] = mask
    needs_history = any(p.repetition_penalty != 1.0 for p in params)

    tokens: list[list[int]] = [[] for _ in range(B)]
    reasons: list[Optional[str]] = [None] * B
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = KVCache(len(model.layers), max_len=T + max_new) if use_cache else None
            step_input, step_mask = input_ids, mask
            for step in range(max_new):
                cur = T + step
                if use_cache:
                    logits = model(step_input, attention_mask=step_mask, kv_cache=cache, logits_to_keep=1)
                else:
                    full_mask = seq_mask[:, :cur] if mask is not None else None
                    logits = model(seq[:, :cur], attention_mask=full_mask, logits_to_keep=1)
                history = (seq[:, :cur], seq_mask[:, :cur]) if needs_history else (None, None)
                next_ids = select_next_tokens(logits[:, -1], params, history[0], generators, history_mask=history[1])
                seq[:, cur] = next_ids
                for i, t in enumerate(next_ids.tolist()):
                    if reasons[i] is not None:
                        continue  # a finished row keeps computing (static batch); its tokens are dropped
                    tokens[i].append(t)
                    if t in stop_ids[i] or (stop_fn is not None and stop_fn(i, tokens[i])):
                        reasons[i] = "stop"
                    elif len(tokens[i]) >= params[i].max_new_tokens:
                        reasons[i] = "length"
                if all(r is not None for r in reasons):
                    break
                step_input, step_mask = next_ids.unsqueeze(1), None  # (B, 1); the cache keeps the pads' mask
    finally:
        model.train(was_training)
    prompt_lens = mask.sum(1).tolist() if mask is not None else [T] * B
    return DecodeOutput(tokens=tokens, finish_reasons=[r or "length" for r in reasons], prompt_lens=prompt_lens)


def greedy_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    eos_id: Optional[int] = None,
    use_cache: bool = True,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Greedy ``decode`` in tensor-in, tensor-out form: up to ``max_new_tokens`` argmax tokens
    appended to each prompt; returns (B, T + new).

    Prompts of different lengths go left-padded with an ``attention_mask`` (B, T), 1 = real.
    A row that produced ``eos_id`` keeps receiving ``eos_id``; generation stops early once
    every row has. The model runs in eval mode (no dropout) and its mode is restored after.
    """
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
