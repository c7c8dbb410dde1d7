"""Mixture-of-experts feed-forward layer with top-k routing and fixed expert capacity.

Routing (Switch Transformer / GShard, without the random jitter, so it is deterministic):
1. router logits (N, E) -> softmax probs; each token picks its top_k experts.
2. Gate weights: the top-k probs renormalised to sum to 1 (Mixtral). For top_k = 1 the
   renormalised weight would be the constant 1 and the router would get no gradient from the
   LM loss, so there the raw prob is used, as in Switch.
3. Each expert takes at most capacity = ceil(capacity_factor * N * top_k / E) assignments.
   First choices of all tokens are served before second choices (GShard's priority), then in
   token order. An assignment beyond capacity is dropped: that token gets nothing from that
   expert and the residual connection carries it through the layer unchanged.
4. Load-balancing loss E * sum_e f_e * P_e, with f_e the fraction of assignments routed to e
   (before dropping) and P_e the mean router prob of e: 1 when balanced, up to E when
   collapsed. Stored as ``last_aux_loss``; the model sums it with ``aux_loss_coef``.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm_ray.config import ModelConfig
from llm_ray.models.ffn import dense_ffn


class MoEFeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts = cfg.moe.num_experts
        self.top_k = cfg.moe.top_k
        self.capacity_factor = cfg.moe.capacity_factor
        self.router = nn.Linear(cfg.d_model, self.num_experts, bias=False)
        self.experts = nn.ModuleList([dense_ffn(cfg) for _ in range(self.num_experts)])
        # Statistics of the last forward, for the loss and for logging.
        self.last_aux_loss = torch.zeros(())
        self.last_dropped = torch.zeros((), dtype=torch.long)  # assignments over capacity

    def capacity(self, n_tokens: int) -> int:
        return math.ceil(self.capacity_factor * n_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])  # (N, d)
        N, E, K = flat.shape[0], self.num_experts, self.top_k

        # Route in fp32: the softmax and the loss are sensitive to bf16 rounding.
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        top_p, top_e = probs.topk(K, dim=-1)  # (N, K)
        if K > 1:
            top_p = top_p / top_p.sum(dim=-1, keepdim=True)

        # Flatten assignments choice-major: all first choices, then all second choices, ...
        expert_of = top_e.t().reshape(-1)  # (K*N,)
        weight_of = top_p.t().reshape(-1)  # (K*N,)
        token_of = torch.arange(N, device=x.device).repeat(K)  # (K*N,)
        one_hot = F.one_hot(expert_of, E)  # (K*N, E)
        # Slot of each assignment in its expert's queue; beyond capacity it is dropped.
        slot = (one_hot.cumsum(dim=0) - 1).gather(1, expert_of.unsqueeze(1)).squeeze(1)  # (K*N,)
        keep = slot < self.capacity(N)

        out = torch.zeros_like(flat)  # (N, d)
        for e, expert in enumerate(self.experts):
            # Every expert runs, even on zero tokens, so all parameters stay in the autograd
            # graph (DDP/ZeRO expect a gradient, possibly zero, for every parameter).
            idx = torch.nonzero((expert_of == e) & keep, as_tuple=True)[0]  # (n_e,)
            tok = token_of[idx]
            y = expert(flat[tok]) * weight_of[idx].unsqueeze(1).to(flat.dtype)  # (n_e, d)
            out.index_add_(0, tok, y)

        frac = one_hot.float().mean(dim=0)  # (E,) f_e: share of the K*N assignments
        mean_prob = probs.mean(dim=0)  # (E,) P_e
        self.last_aux_loss = E * (frac * mean_prob).sum()
        self.last_dropped = (~keep).sum()
        return out.view(shape)
