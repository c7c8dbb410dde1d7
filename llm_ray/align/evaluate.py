"""Held-out figures of preference learning, computed on the driver with plain torch.

Reward model: pair accuracy, mean margin, expected calibration error of σ(r_c − r_r), and the
correlation of reward with response length — the first reward-hacking signal (a reward model
that pays for length teaches PPO to ramble). DPO: the same pair figures for the implicit
reward β·(log π − log π_ref).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from llm_ray.models.losses import IGNORE_INDEX, sequence_logprobs


def _batches(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


@torch.no_grad()
def rewards_of(model, input_ids: np.ndarray, lengths: np.ndarray, device, batch_size: int = 16) -> np.ndarray:
    """A ``RewardModel``'s rewards (N,) for right-padded rows (N, T) of known lengths."""
    model.eval()
    out = [model(torch.from_numpy(input_ids[s]).to(device), torch.from_numpy(lengths[s]).to(device)).float().cpu()
           for s in _batches(len(input_ids), batch_size)]
    return torch.cat(out).numpy()


@torch.no_grad()
def logps_of(model, input_ids: np.ndarray, labels: np.ndarray, device, batch_size: int = 16, average: bool = False) -> np.ndarray:
    """Sequence log-probs (N,) of the labelled (response) tokens under a causal LM."""
    model.eval()
    out = [sequence_logprobs(model(torch.from_numpy(input_ids[s]).to(device)), torch.from_numpy(labels[s]).to(device), average).cpu()
           for s in _batches(len(input_ids), batch_size)]
    return torch.cat(out).numpy()


def expected_calibration_error(p_chosen: np.ndarray, bins: int = 10) -> float:
    """ECE of the predicted probability that the chosen response wins.

    Every pair is counted in both orders — (p, outcome 1) and (1 − p, outcome 0) — so the
    outcomes are balanced and a model that always says 0.5 scores 0; then the usual binned ECE:
    Σ_b |b|/N · |mean confidence − mean outcome| over equal-width bins of the prediction.
    """
    pred = np.concatenate([p_chosen, 1 - p_chosen])
    outcome = np.concatenate([np.ones_like(p_chosen), np.zeros_like(p_chosen)])
    which = np.minimum((pred * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(pred[inside].mean() - outcome[inside].mean())
    return float(ece)


def _corr(x: np.ndarray, y: np.ndarray) -> Optional[float]:
    if len(x) < 2 or np.std(x) == 0 or np.std(y) == 0:
        return None  # undefined, not zero: say so rather than report a fake "no correlation"
    return float(np.corrcoef(x, y)[0, 1])


def pair_metrics(chosen: np.ndarray, rejected: np.ndarray, chosen_tokens: np.ndarray, rejected_tokens: np.ndarray) -> dict:
    """Figures of scores (N,) for the chosen and rejected side of N held-out pairs.

    ``accuracy`` counts a tie as half a win (a tie is a coin flip; before DPO trains, every
    implicit reward is 0 and the accuracy is the chance level 0.5).
    """
    diff = chosen.astype(np.float64) - rejected.astype(np.float64)
    p = 1 / (1 + np.exp(-diff))
    return {
        "accuracy": float(np.mean((diff > 0) + 0.5 * (diff == 0))),
        "mean_margin": float(diff.mean()),
        "ece": expected_calibration_error(p),
        "reward_length_corr": _corr(np.concatenate([chosen, rejected]), np.concatenate([chosen_tokens, rejected_tokens]).astype(float)),
        "chosen_minus_rejected_tokens": float(np.mean(chosen_tokens.astype(float) - rejected_tokens)),
    }


def response_tokens(labels: np.ndarray) -> np.ndarray:
    """(N, T) labels -> (N,) number of labelled (response) tokens."""
    return (labels != IGNORE_INDEX).sum(1)
