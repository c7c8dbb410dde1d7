"""Decoder-only language model (GPT-2 and Llama shapes), as three standalone parts.

``DecoderLM`` = ``DecoderEmbedding`` -> n x ``DecoderBlock`` -> ``DecoderHead``. The pipeline
adapter builds these parts on different processes, so each works alone: a block computes its
own rotary angles and masks from its forward arguments, and each part initialises itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from llm_ray.config import ModelConfig
from llm_ray.models.attention import Attention, segment_position_ids
from llm_ray.models.ffn import make_ffn
from llm_ray.models.kv_cache import KVCache, full_padding_mask
from llm_ray.models.layers import (
    RotaryEmbedding,
    default_position_ids,
    init_weights,
    make_norm,
    make_positions,
    mark_vocab,
)
from llm_ray.models.moe import MoEFeedForward


class DecoderEmbedding(nn.Module):
    """input_ids (B, T) -> hidden (B, T, d): tokens, plus learned/sinusoidal positions.

    Shared with the encoder. Under post-norm (BERT) the sum is normalised, as BERT does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos = make_positions(cfg)  # None for rope: positions enter inside attention
        self.norm = make_norm(cfg) if cfg.norm_position == "post" else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        init_weights(self, cfg)

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.tok(input_ids)  # (B, T, d)
        if self.pos is not None:
            if position_ids is None:
                position_ids = default_position_ids(None, 0, input_ids.shape[1], input_ids.device)
            x = x + self.pos(position_ids).to(x.dtype)  # (B|1, T, d) broadcast over the batch
        return self.drop(self.norm(x))


class DecoderBlock(nn.Module):
    """One transformer layer: attention then FFN, each with a residual connection.

    ``causal=False`` gives the bidirectional encoder block (same class, one flag).
    Pre-norm (GPT-2/Llama): x + f(norm(x)). Post-norm (BERT): norm(x + f(x)).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int, causal: bool = True):
        super().__init__()
        self.layer_idx = layer_idx
        self.post_norm = cfg.norm_position == "post"
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta) if cfg.positions == "rope" else None
        self.attn_norm = make_norm(cfg)
        self.attn = Attention(cfg, layer_idx, causal=causal)
        self.ffn_norm = make_norm(cfg)
        self.ffn = make_ffn(cfg, layer_idx)
        self.drop = nn.Dropout(cfg.dropout)
        init_weights(self, cfg)

    def forward(
        self,
        x: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d). attention_mask: (B, cached + T) or (B, T), 1 = real token.
        segment_ids (B, T): document ids of packed sequences; attention stays inside a document
        and positions restart at each (see ``Attention.forward``)."""
        T = x.shape[1]
        padding_mask = full_padding_mask(attention_mask, kv_cache, self.layer_idx, T)  # (B, S) | None
        rope = None
        if self.rotary is not None:
            if position_ids is None and segment_ids is not None:
                position_ids = segment_position_ids(segment_ids)  # (B, T)
            if position_ids is None:
                past = kv_cache.seq_len(self.layer_idx) if kv_cache is not None else 0
                position_ids = default_position_ids(padding_mask, past, T, x.device)
            rope = self.rotary(position_ids)  # cos, sin: (B|1, 1, T, hd)

        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        if self.post_norm:
            x = self.attn_norm(x + self.drop(self.attn(x, rope, padding_mask, kv_cache, **seg)))
            return self.ffn_norm(x + self.drop(self.ffn(x)))
        x = x + self.drop(self.attn(self.attn_norm(x), rope, padding_mask, kv_cache, **seg))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class DecoderHead(nn.Module):
    """hidden (B, T, d) -> logits (B, T, V): final norm (pre-norm only) and the LM projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Post-norm blocks already end in a norm; a second one would only rescale.
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.proj = mark_vocab(nn.Linear(cfg.d_model, cfg.vocab_size, bias=False))
        init_weights(self, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def moe_aux_loss(model: nn.Module, cfg: ModelConfig) -> torch.Tensor:
    """aux_loss_coef * sum of the MoE layers' load-balancing losses from the last forward."""
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            total = total + m.last_aux_loss.to(device)
    return cfg.moe.aux_loss_coef * total


class DecoderLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = DecoderEmbedding(cfg)
        self.layers = nn.ModuleList([DecoderBlock(cfg, i) for i in range(cfg.n_layers)])
        self.head = DecoderHead(cfg)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embedding.tok.weight  # one Parameter, shared

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        kv_cache: Optional[KVCache] = None,
        logits_to_keep: int = 0,
        segment_ids: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). See DecoderBlock.forward for the mask.

        ``logits_to_keep`` > 0 projects only the last that many positions (B, k, V): generation
        needs the last one, and projecting a whole prompt onto the vocab is a large share of a prefill.
        ``segment_ids`` (B, T): document ids of packed training sequences (block-diagonal causal
        attention, positions restarting per document); None keeps plain causal attention."""
        T = input_ids.shape[1]
        if position_ids is None and segment_ids is not None:
            position_ids = segment_position_ids(segment_ids)  # (B, T)
        if position_ids is None:
            # Computed once here (the blocks would compute the same ones) for the embedding.
            past = kv_cache.length if kv_cache is not None else 0
            padding_mask = full_padding_mask(attention_mask, kv_cache, 0, T)
            position_ids = default_position_ids(padding_mask, past, T, input_ids.device)
        x = self.embedding(input_ids, position_ids)  # (B, T, d)
        seg = {} if segment_ids is None else {"segment_ids": segment_ids}
        for layer in self.layers:
            x = layer(x, attention_mask, position_ids, kv_cache, **seg)
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]  # (B, k, d)
        return self.head(x)  # (B, T, V)

    def aux_loss(self) -> torch.Tensor:
        return moe_aux_loss(self, self.cfg)
