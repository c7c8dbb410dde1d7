"""BERT-style bidirectional encoder with a masked-LM head.

The layers are ``DecoderBlock(causal=False)`` and the embedding is the decoder's: one block
class for both architectures. BERT's shape is ``positions: learned, norm: layernorm,
norm_position: post, ffn: gelu, bias: true``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_ray.config import ModelConfig
from llm_ray.models.decoder import DecoderBlock, DecoderEmbedding, moe_aux_loss
from llm_ray.models.layers import default_position_ids, init_weights, make_norm, mark_vocab


class MLMHead(nn.Module):
    """hidden (B, T, d) -> logits (B, T, V): dense, GELU, LayerNorm, projection with bias (BERT)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.d_model, cfg.d_model, bias=True)
        self.norm = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.proj = mark_vocab(nn.Linear(cfg.d_model, cfg.vocab_size, bias=True))
        self.approximate = cfg.gelu_approximate  # BERT's head uses the model's activation
        init_weights(self, cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(F.gelu(self.dense(x), approximate=self.approximate)))


class EncoderMLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = DecoderEmbedding(cfg)
        self.layers = nn.ModuleList([DecoderBlock(cfg, i, causal=False) for i in range(cfg.n_layers)])
        # Pre-norm stacks need a final norm; post-norm blocks already end in one.
        self.norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        init_weights(self.norm, cfg)
        self.head = MLMHead(cfg)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embedding.tok.weight

    def encode(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T), attention_mask (B, T) 1 = real -> final hidden states (B, T, d)."""
        mask = attention_mask.bool() if attention_mask is not None else None
        # Positions count real tokens only: 0..n-1 with BERT's right padding, and the same
        # for left-padded input; one set serves learned, sinusoidal and rotary positions.
        position_ids = default_position_ids(mask, 0, input_ids.shape[1], input_ids.device)
        x = self.embedding(input_ids, position_ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, attention_mask, position_ids)
        return self.norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.head(self.encode(input_ids, attention_mask))  # (B, T, V)

    def aux_loss(self) -> torch.Tensor:
        return moe_aux_loss(self, self.cfg)
