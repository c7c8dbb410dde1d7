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


def sequence_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) each row's mean cross entropy over its labelled positions (0 for a row with none):
    the per-example loss DP-SGD clips. logits (B, T, V), labels (B, T)."""
    mask = labels != IGNORE_INDEX
    return -token_logprobs(logits, labels).sum(1) / mask.sum(1).clamp(min=1)


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


# -- RL (PPO, GRPO) --------------------------------------------------------------------------------
# Per-token tensors are (B, T) aligned with ``labels`` (position t predicts token t+1), zero
# where ``mask`` (the response tokens) is False. OpenRLHF models/loss.py and TRL's PPO/GRPO
# trainers are the references; each formula is written out in its docstring.

KLEstimator = Literal["k1", "k2", "k3"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of ``x`` over True positions of ``mask`` (all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked positions (std unbiased); ``shift_mean=False`` adds the
    mean back (scale only, as TRL does for advantages when asked); zero outside the mask."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    var = (((x - mean) * mask) ** 2).sum() / (n - 1)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from samples of π (Schulman, "Approximating KL
    divergence"), with log r = log π_ref − log π at the sampled token:
    k1 = −log r (unbiased, can be negative), k2 = ½ (log r)², k3 = (r − 1) − log r (unbiased,
    never negative; GRPO's choice)."""
    log_r = ref_logp.float() - logp.float()
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r ** 2
    if estimator == "k3":
        log_r = log_r.clamp(-20, 20)  # exp overflow on a token the reference finds impossible
        return torch.exp(log_r) - 1 - log_r
    raise ValueError(f"unknown KL estimator {estimator!r}")


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each row's response tokens.

    δ_t = r_t + γ·V_{t+1} − V_t,  A_t = δ_t + γλ·A_{t+1},  returns R_t = A_t + V_t;
    V after a row's last response token is 0 (the episode ends there). (B, T) -> (A, R), zero
    outside ``mask``.
    """
    mask = mask.float()
    rewards, values = rewards.float() * mask, values.float() * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        advantages[:, t] = last
    return advantages, (advantages + values) * mask


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024): each sample's reward minus the mean of its prompt's group of
    ``group_size`` samples, divided by the group's std when ``scale`` (Dr. GRPO leaves it out).
    rewards (B,) with a prompt's samples adjacent -> (B,)."""
    r = rewards.float().view(-1, group_size)  # (prompts, G)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps) if group_size > 1 else centred
    return centred.flatten()


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: Optional[float] = None,
    aggregate: Literal["token_mean", "seq_mean"] = "token_mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), to minimise:
    mean over tokens of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε_high)), ρ = exp(log π − log π_old).

    ``aggregate``: token_mean (every response token weighs the same: DAPO, OpenRLHF) or
    seq_mean (mean per sequence, then over sequences: the GRPO paper). Metrics: clip fraction,
    approx KL(π_old ‖ π) as k3 of the ratio (what TRL and OpenRLHF log), mean ratio.
    """
    log_ratio = (logp.float() - old_logp.float()).clamp(-20, 20)
    ratio = torch.exp(log_ratio)
    high = clip_eps if clip_eps_high is None else clip_eps_high
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - clip_eps, 1 + high)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_mean(per_token, mask) if aggregate == "token_mean" else masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        metrics = {
            "clip_fraction": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(torch.exp(-log_ratio) - 1 + log_ratio, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip: Optional[float] = 0.2
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's value loss ½·mean max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±c)
    (the OpenAI baselines form); ``clip=None`` is the plain ½·mean (V − R)²."""
    values, returns = values.float(), returns.float()
    err = (values - returns) ** 2
    if clip is not None:
        clipped = old_values.float() + (values - old_values.float()).clamp(-clip, clip)
        clip_err = (clipped - returns) ** 2
        fraction = masked_mean((clip_err > err).float(), mask)
        err = torch.maximum(err, clip_err)
    else:
        fraction = torch.zeros((), device=values.device)
    return 0.5 * masked_mean(err, mask), {"value_clip_fraction": fraction.detach()}


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's next-token distribution: (B, T, V) -> (B, T)."""
    logits = logits.float()
    logz = torch.logsumexp(logits, dim=-1, keepdim=True)
    p = torch.exp(logits - logz)
    return (logz.squeeze(-1) - (p * logits).sum(-1))


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                      temperature: float = 2.0, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hinton et al. 2015 / DistilBERT: α·T²·KL(softmax(z_t/T) ‖ softmax(z_s/T)) + (1−α)·CE.

    logits (B, T, V), labels (B, T) with IGNORE_INDEX where no token is scored (both terms are
    means over the scored positions). T² keeps the soft term's gradient scale independent of T.
    Returns (loss, the KL term, the CE term).
    """
    mask = labels != IGNORE_INDEX  # (B, T)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, T) KL(teacher ‖ student) per position
    kl = masked_mean(kl, mask.float()) * temperature ** 2
    ce = token_cross_entropy(student_logits, labels)
    return alpha * kl + (1 - alpha) * ce, kl, ce


def hidden_cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """DistilBERT's cosine term: mean over unmasked positions of 1 − cos(h_s, h_t); hidden (B, T, d)."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)  # (B, T)
    return masked_mean(1 - cos, mask.float())


def proximal_term(params: list[torch.Tensor], anchor: list[torch.Tensor]) -> torch.Tensor:
    """||w - w0||^2 summed over parameter tensors (FedProx's term, before its mu/2)."""
    return sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
