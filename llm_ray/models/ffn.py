"""Position-wise feed-forward networks: SwiGLU (Llama) and the GELU MLP (GPT-2, BERT)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_ray.config import ModelConfig
from llm_ray.models.layers import mark_residual


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, d_model: int, d_ff: int, bias: bool = False):
        super().__init__()
        self.gate = nn.Linear(d_model, d_ff, bias=bias)
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = mark_residual(nn.Linear(d_ff, d_model, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # (..., d_ff) -> (..., d)


class GeluMLP(nn.Module):
    """down(gelu(up(x))), the classic two-layer MLP.

    ``approximate="tanh"`` is GPT-2's GELU ("gelu_new"); BERT uses the exact erf form ("none").
    """

    def __init__(self, d_model: int, d_ff: int, bias: bool = True, approximate: str = "none"):
        super().__init__()
        self.approximate = approximate
        self.up = nn.Linear(d_model, d_ff, bias=bias)
        self.down = mark_residual(nn.Linear(d_ff, d_model, bias=bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x), approximate=self.approximate))  # (..., d_ff) -> (..., d)


def dense_ffn(cfg: ModelConfig) -> nn.Module:
    """One dense FFN of the kind and width the config asks for (also an MoE expert)."""
    if cfg.ffn == "swiglu":
        return SwiGLU(cfg.d_model, cfg.ffn_dim, bias=cfg.bias)
    return GeluMLP(cfg.d_model, cfg.ffn_dim, bias=cfg.bias, approximate=cfg.gelu_approximate)


def is_moe_layer(cfg: ModelConfig, layer_idx: int) -> bool:
    return cfg.moe.enabled and (layer_idx + 1) % cfg.moe.every_n_layers == 0


def make_ffn(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """The FFN of layer ``layer_idx``: mixture-of-experts where the config puts one, else dense."""
    if is_moe_layer(cfg, layer_idx):
        from llm_ray.models.moe import MoEFeedForward  # moe imports dense_ffn from here

        return MoEFeedForward(cfg)
    return dense_ffn(cfg)
