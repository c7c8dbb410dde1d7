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

    outputs     the generated ids per row (list of B lists), for presence/frequency penalties

    make_generators(params, device) -> list[torch.Generator | None]   (seeded per row)
    process_logits(logits, params, history, history_mask=None, outputs=None) -> (B, V) scores
    choose_tokens(scores, params, generators) -> (B,) ids
    chosen_logprobs(logits, scores, ids, top_n) -> model and sampler log-probs of the ids

Order of operations: OpenAI's logit bias, then Hugging Face ``generate``'s repetition penalty,
OpenAI's presence/frequency penalties (logits processors),
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


def apply_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """OpenAI ``logit_bias``: each row's {token id: bias} added to its logits; ids past the
    vocabulary are ignored (the serving layer refuses them first). (B, V) -> (B, V)"""
    rows = [(i, p.logit_bias) for i, p in enumerate(params) if p.logit_bias]
    if not rows:
        return logits
    V = logits.shape[1]
    bias = torch.zeros_like(logits)
    for i, b in rows:
        ids = [t for t in b if t < V]
        bias[i, ids] = torch.tensor([b[t] for t in ids], dtype=logits.dtype, device=logits.device)
    return logits + bias


def apply_presence_frequency(logits: torch.Tensor, params: list[SamplingParams], outputs: Sequence[Sequence[int]]) -> torch.Tensor:
    """OpenAI's penalties over the GENERATED tokens (as vLLM; the prompt does not count):
    logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty. (B, V)"""
    B, V = logits.shape
    dev = logits.device
    counts = torch.zeros(B, V, dtype=logits.dtype, device=dev)
    for i, out in enumerate(outputs):
        if out:
            ids = torch.tensor(list(out), dtype=torch.long, device=dev).clamp(max=V - 1)
            counts[i].index_add_(0, ids, torch.ones(len(ids), dtype=logits.dtype, device=dev))
    freq = torch.tensor([p.frequency_penalty for p in params], dtype=logits.dtype, device=dev).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params], dtype=logits.dtype, device=dev).unsqueeze(1)
    return logits - counts * freq - (counts > 0).to(logits.dtype) * pres


def process_logits(
    logits: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    history: History = None,
    history_mask: Optional[torch.Tensor] = None,
    outputs: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """Logit bias, repetition penalty, presence/frequency penalties (over ``outputs``, the
    generated ids per row), then (sampled rows only) temperature, top-k, top-p. (B, V) -> (B, V).

    Greedy rows get only the bias and penalties: HF, too, applies no warper without sampling.
    Temperature divides ``logits - max`` so that a tiny temperature gives a peaked but finite
    distribution instead of inf - inf = NaN.
    """
    B = logits.shape[0]
    params = _as_list(params, B)
    dev = logits.device
    logits = apply_logit_bias(logits.float(), params)  # softmax and cumsum in fp32 whatever the model's dtype
    penalty = torch.tensor([p.repetition_penalty for p in params], device=dev)
    if history is not None and bool((penalty != 1.0).any()):
        if not isinstance(history, torch.Tensor):
            history, history_mask = _history_tensor(history, B, dev)
        logits = apply_repetition_penalty(logits, history.to(dev), penalty, history_mask)
    if outputs is not None and any(p.presence_penalty or p.frequency_penalty for p in params):
        logits = apply_presence_frequency(logits, params, outputs)
    sampled = [not p.greedy for p in params]
    if not any(sampled):
        return logits
    temp = torch.tensor([p.temperature if s else 1.0 for p, s in zip(params, sampled)], device=dev)
    top = logits.max(dim=-1, keepdim=True).values  # (B, 1)
    logits = (logits - top) / temp.unsqueeze(1)
    top_k = torch.tensor([min(p.top_k, logits.shape[1]) if s else 0 for p, s in zip(params, sampled)], device=dev)
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
            g.manual_seed(p.seed % 2**64)  # manual_seed takes [0, 2**64); OpenAI seeds are any int
            out.append(g)
    return out


def select_next_tokens(
    logits: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    history: History = None,
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
    history_mask: Optional[torch.Tensor] = None,
    outputs: Optional[Sequence[Sequence[int]]] = None,
) -> torch.Tensor:
    """(B, V) last-position logits -> (B,) next token ids, each row by its own params."""
    return choose_tokens(process_logits(logits, _as_list(params, logits.shape[0]), history, history_mask, outputs), params, generators)


def choose_tokens(
    scores: torch.Tensor,
    params: Union[SamplingParams, Sequence[SamplingParams]],
    generators: Optional[Sequence[Optional[torch.Generator]]] = None,
) -> torch.Tensor:
    """(B, V) processed scores -> (B,) ids: argmax for greedy rows, one draw for sampled rows."""
    B = scores.shape[0]
    params = _as_list(params, B)
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


def chosen_logprobs(
    logits: torch.Tensor, scores: torch.Tensor, next_ids: torch.Tensor, top_n: int = 0
) -> tuple[torch.Tensor, torch.Tensor, Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Log-probs of the chosen tokens: under the model (``log_softmax(logits)``, what OpenAI's
    ``logprobs`` report) and under the distribution they were drawn from (``log_softmax`` of the
    processed ``scores``: temperature, top-k/p, penalties; what an RL trainer needs to correct for
    the sampler). Returns (B,) model, (B,) sampler, and the ``top_n`` most likely model tokens
    ((B, top_n) log-probs, (B, top_n) ids) or None.
    """
    model_lp = torch.log_softmax(logits.float(), dim=-1)  # (B, V)
    sampler_lp = torch.log_softmax(scores.float(), dim=-1)
    idx = next_ids.unsqueeze(1)
    top = torch.topk(model_lp, top_n, dim=-1) if top_n > 0 else None
    return model_lp.gather(1, idx)[:, 0], sampler_lp.gather(1, idx)[:, 0], (None if top is None else (top.values, top.indices))
