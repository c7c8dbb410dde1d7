"""Beam search with length penalty and early stopping, step for step as ``transformers`` does it.

The algorithm is HF's vectorised beam search (``GenerationMixin._beam_search``, transformers 5):
per prompt keep ``num_beams`` running hypotheses; each step take the top
K = max(2, 1 + n_eos) * num_beams continuations of all beams by accumulated log-probability;
those ending in eos (or reaching the length limit) among the top num_beams compete for the
finished list with score sum(logprobs) / generated_len ** length_penalty; the best num_beams
non-finished ones run on. A prompt stops when its finished list is full and ``early_stopping``
is True, or when the best running beam cannot beat the worst finished one (``False``: judged
at the current length; ``"never"``: at the longest possible length when length_penalty > 0).
Following it decision for decision is what makes outputs token-for-token equal to HF's.

Differences that do not change results: the prompts are prefilled once (not num_beams times)
and the KV cache rows are then copied per beam; the cache is reordered with ``index_select``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from llm_ray.generation.config import GenerationConfig, SamplingParams
from llm_ray.generation.logits import process_logits
from llm_ray.generation.sampling import check_length
from llm_ray.models.kv_cache import KVCache

NEG = -1.0e9  # HF's "impossible" score: large but finite, so sums stay ordered


@dataclass
class BeamOutput:
    """Per prompt, the best ``num_return_sequences`` hypotheses, best first."""

    tokens: list[list[list[int]]]  # [prompt][hypothesis] -> generated ids (eos included)
    scores: list[list[float]]  # length-penalised sum of log-probabilities
    finish_reasons: list[list[str]]  # "stop" (ended in eos) | "length"


def _gather(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) -> (B, k, ...) picking beams idx (B, k) along dim 1."""
    while idx.dim() < t.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(t, idx, dim=1)


def beam_search(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    config: GenerationConfig,
    attention_mask: Optional[torch.Tensor] = None,
    eos_ids: Sequence[int] = (),
    use_cache: bool = True,
    pad_id: Optional[int] = None,
) -> BeamOutput:
    """Beam search for left-padded prompts input_ids (B, T) with attention_mask (B, T)."""
    B, T = input_ids.shape
    nb, dev = config.num_beams, input_ids.device
    check_length(model, T, config.max_new_tokens)
    eos = sorted(set(eos_ids) | set(config.stop_token_ids))
    eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
    max_length = T + config.max_new_tokens
    k_keep = max(2, 1 + len(eos)) * nb  # enough candidates that num_beams stay unfinished
    top_nb = torch.arange(k_keep, device=dev) < nb  # (K,) only the top num_beams may finish
    penalty_only = SamplingParams(repetition_penalty=config.repetition_penalty)  # beams never sample
    fill = pad_id if pad_id is not None else (eos[0] if eos else 0)

    mask = attention_mask.bool().to(dev) if attention_mask is not None else None
    if mask is not None and bool(mask.all()):
        mask = None
    running = torch.full((B, nb, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :T] = input_ids.unsqueeze(1)
    finished_seqs = running.clone()
    running_scores = torch.zeros(B, nb, device=dev)
    running_scores[:, 1:] = NEG  # only beam 0 is live at first: no duplicate hypotheses
    finished_scores = torch.full((B, nb), NEG, device=dev)
    is_finished = torch.zeros(B, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    # running_src[b, j, s]: flat (prompt * nb + beam) row that beam j came from at step s
    running_src = torch.full((B, nb, config.max_new_tokens), -1, dtype=torch.long, device=dev)
    finished_src = running_src.clone()
    flat_mask = mask.repeat_interleave(nb, dim=0) if mask is not None else None  # (B*nb, T)

    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = KVCache(len(model.layers), max_len=max_length) if use_cache else None
            cur = T
            while True:
                if cur == T:
                    # Prefill each prompt once, then give every beam its own copy of the cache.
                    logits = model(input_ids, attention_mask=mask, kv_cache=cache, logits_to_keep=1)[:, -1]
                    expand = torch.arange(B, device=dev).repeat_interleave(nb)
                    logits = logits.index_select(0, expand)  # (B*nb, V)
                    if cache is not None:
                        cache.reorder(expand)
                elif use_cache:
                    logits = model(running[:, :, cur - 1].reshape(B * nb, 1), kv_cache=cache, logits_to_keep=1)[:, -1]
                else:
                    seqs = running[:, :, :cur].reshape(B * nb, cur)
                    full = None
                    if flat_mask is not None:
                        full = torch.cat([flat_mask, flat_mask.new_ones(B * nb, cur - T)], dim=1)
                    logits = model(seqs, attention_mask=full, logits_to_keep=1)[:, -1]
                log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B*nb, V)
                if config.repetition_penalty != 1.0:
                    # HF passes the whole rows, pads included, to its processors.
                    log_probs = process_logits(log_probs, penalty_only, running[:, :, :cur].reshape(B * nb, cur))
                V = log_probs.shape[-1]
                acc = (log_probs.view(B, nb, V) + running_scores.unsqueeze(-1)).view(B, nb * V)

                # Top-K continuations over all beams of a prompt.
                topk_scores, topk_idx = torch.topk(acc, k_keep)  # (B, K)
                src_beam = topk_idx // V
                topk_ids = topk_idx % V
                topk_seqs = _gather(running, src_beam)  # (B, K, L) copies
                topk_seqs[:, :, cur] = topk_ids
                topk_src = _gather(running_src, src_beam)
                topk_src[:, :, cur - T] = src_beam + torch.arange(B, device=dev).unsqueeze(1) * nb
                hits = torch.isin(topk_ids, eos_t) if eos else torch.zeros_like(topk_ids, dtype=torch.bool)
                if cur + 1 >= max_length:
                    hits = torch.ones_like(hits)  # the length limit ends every hypothesis

                # The best num_beams unfinished continuations run on.
                run_scores = topk_scores + hits.float() * NEG
                keep = torch.topk(run_scores, nb)[1]
                running = _gather(topk_seqs, keep)
                running_scores = _gather(run_scores, keep)
                running_src = _gather(topk_src, keep)

                # Finished ones among the top num_beams compete for the finished list.
                just_done = hits & top_nb.unsqueeze(0)
                done_scores = topk_scores / float(cur + 1 - T) ** config.length_penalty
                full_now = is_finished.all(dim=-1, keepdim=True) & (config.early_stopping is True)
                done_scores = done_scores + full_now.float() * NEG + (~improvable).float() * NEG
                done_scores = done_scores + (~just_done).float() * NEG
                merged = torch.topk(torch.cat([finished_scores, done_scores], 1), nb)[1]
                finished_seqs = _gather(torch.cat([finished_seqs, topk_seqs], 1), merged)
                finished_scores = _gather(torch.cat([finished_scores, done_scores], 1), merged)
                finished_src = _gather(torch.cat([finished_src, topk_src], 1), merged)
                is_finished = _gather(torch.cat([is_finished, just_done], 1), merged)

                if cache is not None:
                    cache.reorder(running_src[:, :, cur - T].reshape(-1))
                cur += 1
                improvable = _still_improvable(
                    improvable, running_scores, finished_scores, is_finished, cur, max_length, T, config
                )
                open_beam = not (bool(is_finished.all()) and config.early_stopping is True)
                if not (bool(improvable.any()) and open_beam and not bool(hits.all())):
                    break
    finally:
        model.train(was_training)
    return _outputs(finished_seqs, finished_scores, finished_src, T, eos, config.num_return_sequences)


def _still_improvable(improvable, running_scores, finished_scores, is_finished, cur, max_length, T, config):
    """HF's early-stop heuristic: can the best running beam still beat the worst finished one?"""
    lp = config.length_penalty
    if config.early_stopping == "never" and lp > 0.0:
        best_len = max_length - T
    else:
        best_len = cur - T
    best_running = running_scores[:, :1] / float(best_len) ** lp
    worst_done = torch.where(is_finished, finished_scores.min(dim=1, keepdim=True)[0], torch.full_like(finished_scores, NEG))
    return improvable & (best_running > worst_done).any(dim=-1, keepdim=True)


def _outputs(seqs, scores, src, T, eos, n_return) -> BeamOutput:
    """Cut each hypothesis to the tokens it generated (the source table marks them)."""
    tokens, out_scores, reasons = [], [], []
    for b in range(seqs.shape[0]):
        hyps, sc, rs = [], [], []
        for j in range(n_return):
            n = int((src[b, j] >= 0).sum())
            toks = seqs[b, j, T : T + n].tolist()
            hyps.append(toks)
            sc.append(float(scores[b, j]))
            rs.append("stop" if toks and toks[-1] in eos else "length")
        tokens.append(hyps)
        out_scores.append(sc)
        reasons.append(rs)
    return BeamOutput(tokens=tokens, scores=out_scores, finish_reasons=reasons)
