"""What a compression changes, measured the same way on both sides: bytes on disk, parameters
and non-zeros, held-out perplexity, greedy decode tokens/s at a few batch sizes."""

from __future__ import annotations

import os
import time

import torch


def folder_bytes(path: str) -> int:
    """Bytes of a model folder's weight file (what compression is meant to shrink)."""
    from llm_ray.bundle.folder import WEIGHTS

    return os.path.getsize(os.path.join(path, WEIGHTS))


def parameter_counts(model: torch.nn.Module) -> dict:
    """Parameters (each tensor once: a tied embedding counts once) and how many are non-zero."""
    seen, params, nonzero = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return {"params": params, "nonzeros": nonzero}


def heldout_perplexity(bundle, text_path: str, max_tokens: int, window: int) -> dict:
    """Sliding-window perplexity (``eval/perplexity.py``) of the first ``max_tokens`` tokens."""
    from llm_ray.eval.perplexity import perplexity

    with open(text_path, encoding="utf-8") as f:
        ids = bundle.tokenizer.encode(f.read()).ids[:max_tokens]
    window = min(window, bundle.cfg.max_seq_len)
    return perplexity(bundle.model, ids, window, max(1, window // 2))


@torch.inference_mode()
def heldout_accuracy(bundle, text_path: str, max_tokens: int, window: int) -> float:
    """Top-1 next-token accuracy over the first ``max_tokens`` tokens, in windows of ``window``
    (each scored token with up to ``window - 1`` tokens of context): a task score where
    perplexity is a loss."""
    with open(text_path, encoding="utf-8") as f:
        ids = bundle.tokenizer.encode(f.read()).ids[:max_tokens]
    window = min(window, bundle.cfg.max_seq_len)
    right = total = 0
    for start in range(0, len(ids) - 1, window - 1):
        chunk = torch.tensor([ids[start:start + window]])
        if chunk.shape[1] < 2:
            break
        pred = bundle.model(chunk[:, :-1]).argmax(-1)  # (1, T-1)
        right += int((pred == chunk[:, 1:]).sum())
        total += chunk.shape[1] - 1
    return right / total


def decode_tokens_per_s(bundle, batch: int, new_tokens: int, prompt_tokens: int = 16, repeats: int = 2) -> float:
    """Generated tokens/s of greedy decoding (KV cache) for ``batch`` rows; best of ``repeats``
    after a warm-up (the first call pays allocation and kernel selection)."""
    from llm_ray.generation.config import SamplingParams
    from llm_ray.generation.sampling import decode

    torch.manual_seed(0)
    ids = torch.randint(5, bundle.cfg.vocab_size, (batch, prompt_tokens))
    params = SamplingParams(max_new_tokens=new_tokens)
    best = 0.0
    with torch.inference_mode():
        decode(bundle.model, ids, params)
        for _ in range(repeats):
            started = time.perf_counter()
            decode(bundle.model, ids, params)
            best = max(best, batch * new_tokens / (time.perf_counter() - started))
    return best


def measure(bundle, spec) -> dict:
    """Every figure of one model folder, for the summary's before / after."""
    figures = {"bytes": folder_bytes(bundle.path), **parameter_counts(bundle.model)}
    figures.update({k: v for k, v in heldout_perplexity(bundle, spec.eval_text, spec.eval_tokens, spec.window).items()
                    if k in ("perplexity", "tokens_scored")})
    figures["next_token_accuracy"] = heldout_accuracy(bundle, spec.eval_text, spec.eval_tokens, spec.window)
    for b in spec.speed_batches:
        figures[f"tokens_per_s_b{b}"] = round(decode_tokens_per_s(bundle, b, spec.speed_new_tokens), 2)
    return figures
