"""Every training loss as a plain tensor function: no Ray, no DeepSpeed, testable on fixed tensors.

Centralised (torchtitan ``components/loss.py``, OpenRLHF ``models/loss.py``) so that objectives
and evaluation share one cross-entropy and one log-prob gather instead of writing their own.
Logits are upcast to fp32 before any softmax: bf16 log-probs of a 50k vocabulary are too coarse
for the small differences DPO and PPO work with.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross entropy over labelled positions. logits (B, T, V) or (N, V); labels (B, T) or (N,)
    with IGNORE_INDEX where nothing is predicted. ``reduction``: mean (over labelled tokens) or sum."""
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction=reduction)


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label) at every position: logits (B, T, V), labels (B, T) -> (B, T), 0 where ignored."""
    mask = labels != IGNORE_INDEX
    safe = torch.where(mask, labels, torch.zeros_like(labels))
    logits = logits.float()
    # x_label - logsumexp(x): the same value as gathering from log_softmax, without a second
    # (B, T, V) fp32 tensor; at a 50k vocabulary that buffer is most of a DPO step's memory
    picked = torch.gather(logits, 2, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    return (picked - torch.logsumexp(logits, dim=-1)) * mask


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean, for IPO) of the labelled tokens' log-probs per row: (B, T, V), (B, T) -> (B,)."""
    logps = token_logprobs(logits, labels).sum(-1)
    if average:
        return logps / (labels != IGNORE_INDEX).sum(-1).clamp(min=1)
    return logps


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy of class logits (B, C) against class ids (B,)."""
    return F.cross_entropy(logits.float(), labels.flatten())


def pairwise_reward_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, margin: Optional[torch.Tensor] = None, center_coef: float = 0.0
) -> torch.Tensor:
    """Bradley-Terry: mean of -log σ(r_c − r_r − margin), rewards (B,).

    ``center_coef`` adds TRL's ``center_rewards_coefficient`` term, coef · mean((r_c + r_r)²),
    which keeps rewards near zero mean (Eisenstein et al. 2023) without changing their order.
    """
    diff = chosen.float() - rejected.float()
    if margin is not None:
        diff = diff - margin.float()
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen.float() + rejected.float()) ** 2).mean()
    return loss


DPOLossType = Literal["sigmoid", "ipo"]


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO and its variants on sequence log-probs (B,); returns (per-pair losses, chosen
    rewards, rejected rewards), the rewards being the implicit β·(log π − log π_ref).

    - sigmoid (Rafailov et al. 2023, eq. 7): −log σ(β·h), h = (π_c − ref_c) − (π_r − ref_r);
      with ``label_smoothing`` ε (conservative DPO, Mitchell 2023): the labels are flipped with
      probability ε, −(1−ε)·log σ(β·h) − ε·log σ(−β·h).
    - ipo (Azar et al. 2023, eq. 17): (h − 1/(2β))², meant for length-averaged log-probs.
    """
    h = (policy_chosen.float() - ref_chosen.float()) - (policy_rejected.float() - ref_rejected.float())
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    chosen_rewards = beta * (policy_chosen.float() - ref_chosen.float()).detach()
    rejected_rewards = beta * (policy_rejected.float() - ref_rejected.float()).detach()
    return losses, chosen_rewards, rejected_rewards
