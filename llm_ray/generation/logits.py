"""Next-token selection, one row at a time or a whole batch: the shared step of every decoder loop.

Stable API (the static-batch loop in ``sampling.py`` and the continuous-batching server both
call it)::

    select_next_tokens(logits, params, history, generators=None) -> (B,) int64 token ids

    logits      (B, V) float: the model's last-position logits, one row per sequence
    params      list of B ``SamplingParams`` (or one, applied to every row): each row has its own
                greedy flag, temperature, top_k, top_p and repetition_penalty
    history     the tokens each row has seen so far (prompt + generated), used by the repetition
                penalty: a (B, L) LongTensor, optionally with ``history_mask`` (B, L) bool
                (True = real token, so left padding is not penalised), or a list of B lists
    generators  list of B ``torch.Generator`` or None (None = torch's global RNG); a row with its
                own generator samples the same tokens whatever else is in the batch

    make_generators(params, device) -> list[torch.Generator | None]   (seeded per row)
    process_logits(logits, params, history, history_mask=None) -> (B, V) processed logits

Order of operations is Hugging Face ``generate``'s: repetition penalty (a logits processor),
then temperature, top-k, top-p (the warpers), then argmax or a draw from softmax. Each rule
matches the corresponding ``transformers`` class (``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``); they are written out
here because HF's take one setting for the whole batch and we need one per row.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from llm_ray.generation.config import SamplingParams

History = Union[torch.Tensor, Sequence[Sequence[int]], None]


def _as_list(params: Union[SamplingParams, Sequence[SamplingParams]], batch: int) -> list[SamplingParams]:
    if isinstance(params, SamplingParams):
        return [params] * batch
    params = list(params)
    if len(params) != batch:
        raise ValueError(f"params: got {len(params)} SamplingParams for a batch of {batch} rows")
    return params


def _history_tensor(history: History, batch: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A list of lists -> right-padded (B, L) ids and its (B, L) mask."""
    rows = [list(r) for r in history]
    if len(rows) != batch:
        raise ValueError(f"history: got {len(rows)} rows for a batch of {batch}")
    width = max((len(r) for r in rows), default=0)
    ids = torch.zeros(batch, max(width, 1), dtype=torch.long)
    mask = torch.zeros(batch, max(width, 1), dtype=torch.bool)
    for i, r in enumerate(rows):
        if r:
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
    return ids.to(device), mask.to(device)


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: torch.Tensor, history_mask: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """CTRL penalty (Keskar et al. 2019) as HF applies it: a seen token's logit is divided by
    ``penalty`` when positive and multiplied by it when negative.

    logits (B, V); history (B, L) ids; penalty (B,) float (1 = off); history_mask (B, L) bool.
    """
    B, V = logits.shape
    counts = torch.zeros(B, V, dtype=torch.int32, device=logits.device)
    ones = history_mask.to(torch.int32) if history_mask is not None else torch.ones_like(history, dtype=torch.int32)
    counts.scatter_add_(1, history, ones)  # scatter_add: duplicates (and masked ids) add, never race
    seen = counts > 0  # (B, V)
    p = penalty.to(logits.dtype).unsqueeze(1)  # (B, 1)
    penalised = torch.where(logits < 0, logits * p, logits / p)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's ``top_k`` largest logits (ties with the k-th kept, as HF); 0 = off. (B, V)"""
    V = logits.shape[1]
    k = top_k.clamp(max=V)
    active = k > 0  # (B,)
    if not bool(active.any()):
        return logits
    kmax = int(k.max())
    top = torch.topk(logits, kmax, dim=-1).values  # (B, kmax), descending
    kth = top.gather(1, (k.clamp(min=1) - 1).unsqueeze(1))  # (B, 1) the k-th largest
    remove = (logits < kth) & active.unsqueeze(1)
    return logits.masked_fill(remove, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filter as HF's ``TopPLogitsWarper``: drop the least likely tokens whose summed
    probability stays <= 1 - top_p, always keeping the most likely one; top_p = 1 is off. (B, V)"""
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V) ascending
    remove_sorted = cum <= (1 - top_p.to(cum.dtype)).unsqueeze(1)
    remove_sorted[:, -1] = False  # min_tokens_to_keep = 1
    remove_sorted &= active.unsqueeze(1)
    remove = remove_sorted.scatter(1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    history: History = None,
    history_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Repetition penalty, then (sampled rows only) temperature, top-k, top-p. (B, V) -> (B, V).

    Greedy rows get only the repetition penalty: HF, too, applies no warper without sampling.
    """
    B = logits.shape[0]
    params = _as_list(params, B)
    dev = logits.device
    logits = logits.float()  # softmax and cumsum in fp32 whatever the model's dtype
    penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if history is not None and bool((penalty != 1.0).any()):
        if not isinstance(history, torch.Tensor):
            history, history_mask = _history_tensor(history, B, dev)
        logits = apply_repetition_penalty(logits, history.to(dev), penalty, history_mask)
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        return logits
    temp = torch.tensor([p.temperature if s else 1.0 for p, s in zip(params, sampled)], device=dev)
    logits = logits / temp.unsqueeze(1)
    top_k = torch.tensor([p.top_k if s else 0 for p, s in zip(params, sampled)], device=dev)
    logits = apply_top_k(logits, top_k)
    top_p = torch.tensor([p.top_p if s else 1.0 for p, s in zip(params, sampled)], device=dev)
    return apply_top_p(logits, top_p)


def make_generators(
    params: Union[SamplingParams, Sequence[SamplingParams]], device: Union[str, torch.device] = "cpu", batch: int = 1
) -> list[Optional[torch.Generator]]:
    """One generator per row seeded with the row's ``seed`` (None where no seed is set)."""
    params = _as_list(params, batch) if isinstance(params, SamplingParams) else list(params)
    out: list[Optional[torch.Generator]] = []
    for p in params:
        if p.seed is None:
            out.append(None)
        else:
            g = torch.Generator(device=device)
            g.manual_seed(p.seed)
            out.append(g)
    return out


def select_next_tokens(
    logits: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    history: History = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    history_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) next token ids, each row by its own params."""
    B = logits.shape[0]
    params = _as_list(params, B)
    scores = process_logits(logits, params, history, history_mask)  # (B, V) fp32
    next_ids = scores.argmax(dim=-1)  # greedy rows keep this
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        if generators is not None and len(generators) != B:
            raise ValueError(f"generators: got {len(generators)} for a batch of {B} rows")
        probs = scores[sampled].softmax(dim=-1)  # (S, V)
        for j, i in enumerate(sampled):
            # One draw per row with the row's generator: its tokens do not depend on the batch.
            g = generators[i] if generators is not None else None
            next_ids[i] = torch.multinomial(probs[j], 1, generator=g)[0]
    return next_ids
