"""Transformer models: decoder LM (GPT-2/Llama shapes, optional MoE) and BERT-style encoder,
sequence heads (classifier, reward), LoRA, the model converters and the losses.

Imports only torch and ``llm_ray.config``: parallelism (DeepSpeed, pipeline stages) is applied
to these modules from outside.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llm_ray.config import ModelConfig
from llm_ray.models.attention import Attention
from llm_ray.models.decoder import DecoderBlock, DecoderEmbedding, DecoderHead, DecoderLM
from llm_ray.models.encoder import EncoderMLM, MLMHead
from llm_ray.models.ffn import GeluMLP, SwiGLU, make_ffn
from llm_ray.models.kv_cache import KVCache
from llm_ray.models.layers import RMSNorm, RotaryEmbedding, SinusoidalPositions, make_norm
from llm_ray.models.moe import MoEFeedForward


def build_model(cfg: ModelConfig) -> nn.Module:
    """``DecoderLM`` for ``arch: decoder``, ``EncoderMLM`` for ``arch: encoder``."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size is 0: set it (or take it from the tokenizer) before build_model")
    if cfg.arch == "decoder":
        return DecoderLM(cfg)
    if cfg.arch == "encoder":
        return EncoderMLM(cfg)
    raise ValueError(f"model.arch: unknown architecture {cfg.arch!r}")


def _embedding_param_ids(model: nn.Module) -> set[int]:
    """Token/position tables and d -> vocab projections (tied or not)."""
    ids = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding) or getattr(m, "vocab_projection", False):
            ids.update(id(p) for p in m.parameters(recurse=False))
    return ids


def count_params(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of parameters, a tied weight counted once.

    ``non_embedding=True`` leaves out token and position embeddings and the vocab projection
    of the head (Kaplan et al. 2020 count N this way; ``flops_per_token`` adds the head back).
    """
    skip = _embedding_param_ids(model) if non_embedding else set()
    # model.parameters() already yields a shared Parameter only once.
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def active_params(model: nn.Module) -> float:
    """Non-embedding parameters one token uses: only top_k of the E experts of an MoE layer."""
    n = float(count_params(model, non_embedding=True))
    for m in model.modules():
        if isinstance(m, MoEFeedForward):
            expert_params = sum(p.numel() for p in m.experts.parameters())
            n -= expert_params * (m.num_experts - m.top_k) / m.num_experts
    return n


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), PaLM paper appendix B:

        6 * N_active + 6 * d_model * vocab_size + 12 * n_layers * n_heads * head_dim * seq_len

    - 6 * N: 2 FLOPs per multiply-add per parameter forward, twice that backward;
      N_active = non-embedding parameters with only top_k/E of each MoE layer's experts.
    - 6 * d * V: the LM head matmul, counted even when tied to the embedding (an embedding
      lookup is free, the head's matmul is not).
    - 12 * L * H * hd * T: attention scores and the weighted sum of values (QK^T and AV), which
      depend on the sequence length and have no parameters; the causal mask is not discounted.
      H * hd = d unless heads were pruned.
    """
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        model = build_model(cfg)
    n_active = active_params(model)
    attn_width = cfg.n_heads * cfg.head_dim
    return 6.0 * n_active + 6.0 * cfg.d_model * cfg.vocab_size + 12.0 * cfg.n_layers * attn_width * seq_len


__all__ = [
    "Attention",
    "DecoderBlock",
    "DecoderEmbedding",
    "DecoderHead",
    "DecoderLM",
    "EncoderMLM",
    "GeluMLP",
    "KVCache",
    "MLMHead",
    "MoEFeedForward",
    "RMSNorm",
    "RotaryEmbedding",
    "SinusoidalPositions",
    "SwiGLU",
    "active_params",
    "build_model",
    "count_params",
    "flops_per_token",
    "make_ffn",
    "make_norm",
]
