"""Multi-head self-attention with grouped k/v heads (MHA, GQA, MQA), RoPE and a KV cache."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_ray.config import ModelConfig
from llm_ray.models.kv_cache import KVCache
from llm_ray.models.layers import apply_rotary, mark_residual


def attention_mask_4d(
    padding_mask: Optional[torch.Tensor], q_len: int, kv_len: int, causal: bool, device: torch.device
) -> torch.Tensor:
    """Boolean SDPA mask (True = attend), (B or 1, 1, q_len, kv_len).

    The queries are the last ``q_len`` of the ``kv_len`` tokens (the rest are cached).
    Every query may attend to itself, whatever the padding says: a left-pad query would
    otherwise have no key at all, softmax would give NaN, and NaN * 0 still poisons the real
    tokens' outputs in later layers. Real tokens never see pads, so their outputs are exact.
    """
    past = kv_len - q_len
    q_pos = torch.arange(q_len, device=device).unsqueeze(1) + past  # (T, 1)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)  # (1, S)
    allowed = k_pos <= q_pos if causal else torch.ones(q_len, kv_len, dtype=torch.bool, device=device)
    allowed = allowed.unsqueeze(0).unsqueeze(0)  # (1, 1, T, S)
    if padding_mask is not None:
        allowed = allowed & padding_mask[:, None, None, :]  # (B, 1, T, S)
    return allowed | (k_pos == q_pos)  # the diagonal: each query sees itself


def segment_position_ids(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids of packed sequences -> (B, T) positions restarting at 0 where each
    document (a run of equal ids) starts."""
    T = segment_ids.shape[1]
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)  # (B, T)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values


class Attention(nn.Module):
    """Self-attention over ``n_heads`` query heads sharing ``kv_heads`` key/value heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.causal = causal
        self.n_heads = cfg.n_heads
        self.kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        d, q_dim, kv_dim = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        # Separate q/k/v projections: k and v are narrower under GQA, and checkpoints in the
        # Llama/HF layout load without splitting a fused matrix.
        self.q_proj = nn.Linear(d, q_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(d, kv_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(d, kv_dim, bias=cfg.bias)
        self.o_proj = mark_residual(nn.Linear(q_dim, d, bias=cfg.bias))

    def forward(
        self,
        x: torch.Tensor,
        rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
        padding_mask: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, d); rope = (cos, sin) for the T new tokens; padding_mask (B, cached + T) bool.

        segment_ids (B, T): document of each token of packed sequences (training, no cache); a
        token then attends only to its own document, block-diagonal causal."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.v_proj(x).view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        if rope is not None:
            cos, sin = rope
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv_cache is not None:
            # The cache stores the narrow (Hkv) k/v: that is GQA's memory saving.
            k, v = kv_cache.update(self.layer_idx, k, v, padding_mask)  # (B, Hkv, S, hd)
        S = k.shape[2]
        if self.kv_heads != self.n_heads and T == 1 and not self.training:
            # Decoding one token under GQA: q heads of a group become rows of one query block,
            # (B, Hkv, rep, hd) against the narrow k/v; no copy of k/v (2x faster here).
            y = self._decode_one_gqa(q, k, v, padding_mask, S)  # (B, H, 1, hd)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
        gqa = {}
        if self.kv_heads != self.n_heads:
            if torch.is_grad_enabled():
                # Training keeps the explicit copy: its bf16 gradients are what runs were tuned on.
                rep = self.n_heads // self.kv_heads
                k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd): q head h reads k/v head h // rep
                v = v.repeat_interleave(rep, dim=1)
            else:
                gqa = {"enable_gqa": True}  # SDPA maps q head h to k/v head h // rep itself

        dropout_p = self.dropout if self.training else 0.0
        if segment_ids is not None:
            if kv_cache is not None:
                raise ValueError("segment_ids: document masking is for training on packed sequences, not with a KV cache")
            mask = attention_mask_4d(padding_mask, T, S, self.causal, x.device)  # (B|1, 1, T, T)
            mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])  # (B, 1, T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        elif padding_mask is None and (S == T or (self.causal and T == 1)):
            # Fast paths: no padding and no cache (SDPA's causal kernel), or a single new token
            # that may see everything cached (no mask at all).
            is_causal = self.causal and S == T
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal, **gqa)
        else:
            mask = attention_mask_4d(padding_mask, T, S, self.causal, x.device)  # (B|1, 1, T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, **gqa)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H * hd): d unless heads were pruned
        return self.o_proj(y)

    def _decode_one_gqa(self, q, k, v, padding_mask, S: int) -> torch.Tensor:
        """q (B, H, 1, hd), k/v (B, Hkv, S, hd) -> (B, H, 1, hd). The single query may see every
        cached key but the padding ones, and always itself (as ``attention_mask_4d``); no
        causal mask is needed."""
        B = q.shape[0]
        rep = self.n_heads // self.kv_heads
        qg = q.reshape(B, self.kv_heads, rep, self.head_dim)  # head h = group h // rep, row h % rep
        mask = None
        if padding_mask is not None:
            mask = padding_mask.clone()
            mask[:, -1] = True
            mask = mask[:, None, None, :]  # (B, 1, 1, S)
        y = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask)  # (B, Hkv, rep, hd)
        return y.reshape(B, self.n_heads, 1, self.head_dim)
