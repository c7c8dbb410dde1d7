"""Sliding-window perplexity (Hugging Face's stride method, docs "Perplexity of fixed-length
models"): windows of up to ``window`` tokens start every ``stride`` tokens; each window scores
only the tokens the previous one did not, so every token is scored exactly once, with up to
``window - 1`` tokens of context. Windows are independent, so they run in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_ray.models.losses import IGNORE_INDEX as IGNORE, token_cross_entropy


@dataclass
class Window:
    begin: int  # first token fed
    end: int  # one past the last token fed
    n_scored: int  # the last n_scored targets of the window are scored


def sliding_windows(n_tokens: int, window: int, stride: int) -> list[Window]:
    """HF's loop: window [begin, min(begin + window, n)), scoring the tokens past the previous end.

    The first window scores ``end - 1`` tokens (token 0 has no context), later ones ``stride``
    (the last one possibly fewer; ``window - 1`` when ``stride == window``).
    """
    if n_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {n_tokens}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride ({stride}) must be in 1..window ({window})")
    windows, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        # Token ``begin`` has no context inside its own window: with stride == window it goes
        # unscored, as in HF's loop.
        n_scored = min(end - prev_end, end - begin - 1)
        windows.append(Window(begin, end, n_scored))
        prev_end = end
        if end == n_tokens:
            break
    return windows


@torch.inference_mode()
def token_nll(model: torch.nn.Module, ids: list[int], window: int, stride: int, batch_size: int = 4) -> tuple[float, int]:
    """(sum of negative log-likelihoods in nats, number of scored tokens) over ``ids``."""
    device = next(model.parameters()).device
    windows = sliding_windows(len(ids), window, stride)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        T = max(w.end - w.begin for w in batch)
        # Right padding: a causal model's earlier positions never see it; its targets are ignored.
        inputs = torch.zeros(len(batch), T, dtype=torch.long)
        labels = torch.full((len(batch), T), IGNORE, dtype=torch.long)
        for row, w in enumerate(batch):
            chunk = torch.tensor(ids[w.begin : w.end])
            inputs[row, : len(chunk)] = chunk
            # Position t predicts token t + 1; score only the last n_scored tokens of the window.
            labels[row, len(chunk) - 1 - w.n_scored : len(chunk) - 1] = chunk[len(chunk) - w.n_scored :]
        logits = model(inputs.to(device)).float()  # (B, T, V)
        total += token_cross_entropy(logits, labels.to(device), reduction="sum").item()
        count += int((labels != IGNORE).sum())
    return total, count


def perplexity(model: torch.nn.Module, ids: list[int], window: int, stride: int, batch_size: int = 4) -> dict:
    """Perplexity of ``ids`` under ``model``: exp(mean token NLL) over every token but the first."""
    max_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
    if max_len is not None and getattr(model.cfg, "positions", "rope") == "learned" and window > max_len:
        raise ValueError(f"window ({window}) exceeds the model's learned position table ({max_len})")
    nll, n = token_nll(model, ids, window, stride, batch_size)
    return {"perplexity": math.exp(nll / n), "nll_per_token": nll / n, "tokens_scored": n}
