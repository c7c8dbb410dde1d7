"""Building blocks shared by every model: norms, positions and the weight initialisation.

Positions come in three kinds (``cfg.positions``):
- ``rope``: rotary embeddings applied to q and k inside attention (Llama);
- ``learned``: a (max_seq_len, d) table added to the token embeddings (GPT-2, BERT);
- ``sinusoidal``: the fixed sin/cos table of "Attention Is All You Need", computed on the fly.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from llm_ray.config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm (no mean subtraction, no bias), as in Llama."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: the mean of squares overflows/underflows easily in fp16/bf16.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The norm the config asks for, over the model dimension."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


def default_position_ids(
    padding_mask: Optional[torch.Tensor], past: int, new_len: int, device: torch.device
) -> torch.Tensor:
    """Positions of the ``new_len`` newest tokens.

    Without padding they are ``past .. past+new_len-1``. With a (B, past+new_len) padding
    mask (1 = real token) a real token's position is the number of real tokens before it,
    so a left-padded prompt gets the same positions as the prompt alone (as in Hugging Face).
    """
    if padding_mask is None:
        return torch.arange(past, past + new_len, device=device).unsqueeze(0)  # (1, T)
    pos = padding_mask.long().cumsum(-1) - 1  # (B, S)
    return pos.clamp(min=0)[:, -new_len:]  # (B, T)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoFormer), in the rotate-half layout used by Llama/HF.

    Holds no state: cos/sin are computed from the position ids in fp32 on every call, so a
    block can compute them alone (pipeline stages) and a bf16 cast of the model cannot
    degrade the frequencies (a registered buffer would be cast too).
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) or (1, T) -> cos, sin each (B, 1, T, head_dim) in fp32."""
        half = torch.arange(0, self.head_dim, 2, device=position_ids.device, dtype=torch.float32)
        inv_freq = 1.0 / (self.theta ** (half / self.head_dim))  # (head_dim/2,)
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, head_dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (B, T, head_dim)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, head_dim) by the angles in cos/sin (B, 1, T, head_dim)."""
    xf = x.float()
    return (xf * cos + _rotate_half(xf) * sin).type_as(x)


class SinusoidalPositions(nn.Module):
    """Fixed sin/cos position vectors, computed on the fly (no table, no length limit)."""

    def __init__(self, dim: int, base: float = 10000.0):
        super().__init__()
        self.dim = dim
        self.base = base

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (B, T) -> (B, T, dim) in fp32: even channels sin, odd channels cos."""
        n_freq = (self.dim + 1) // 2
        idx = torch.arange(n_freq, device=position_ids.device, dtype=torch.float32)
        inv_freq = self.base ** (-2.0 * idx / self.dim)  # (dim/2,)
        angles = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, dim/2)
        pe = torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # (B, T, 2*(dim/2))
        return pe[..., : self.dim]


def make_positions(cfg: ModelConfig) -> Optional[nn.Module]:
    """The additive position module for the embeddings, or None for rope (applied in attention)."""
    if cfg.positions == "learned":
        return nn.Embedding(cfg.max_seq_len, cfg.d_model)
    if cfg.positions == "sinusoidal":
        return SinusoidalPositions(cfg.d_model)
    return None


def mark_residual(linear: nn.Linear) -> nn.Linear:
    """Flag a projection that writes into the residual stream, for GPT-2's scaled init."""
    linear.residual_out = True
    return linear


def mark_vocab(linear: nn.Linear) -> nn.Linear:
    """Flag a d -> vocab projection: counted with the embeddings by ``count_params``."""
    linear.vocab_projection = True
    return linear


@torch.no_grad()
def init_weights(module: nn.Module, cfg: ModelConfig) -> None:
    """GPT-2 initialisation of every submodule of ``module``.

    normal(0, init_std) for Linear and Embedding weights, zero biases, unit norm weights;
    projections into the residual stream get std / sqrt(2 * n_layers) so the residual's
    variance does not grow with depth (GPT-2 paper, section 2.3).
    """
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    for m in module.modules():
        if isinstance(m, nn.Linear):
            std = residual_std if getattr(m, "residual_out", False) else cfg.init_std
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=cfg.init_std)
        elif isinstance(m, (nn.LayerNorm, RMSNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
