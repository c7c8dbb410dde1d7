"""Text in, text out: ``generate(bundle, prompts_or_messages, config) -> list[GenerationResult]``.

Accepts one prompt string, a list of them, one chat (a list of {"role", "content"} dicts) or a
list of chats; chats are rendered with the model's chat template (``chat.py``) and end with
the assistant's generation prompt. Prompts of different lengths are left-padded into one batch.
``num_beams > 1`` runs beam search (``beam.py``), otherwise greedy or sampling (``sampling.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from llm_ray.generation.beam import beam_search
from llm_ray.generation.chat import render_bundle_chat
from llm_ray.generation.config import GenerationConfig
from llm_ray.generation.sampling import decode
from llm_ray.generation.stopping import StopStrings, cut_at_stop

Messages = list[dict]
Inputs = Union[str, Sequence[str], Messages, Sequence[Messages]]


@dataclass
class GenerationResult:
    """One prompt's output. ``alternatives``: the next-best beams when num_return_sequences > 1."""

    prompt: str
    text: str
    token_ids: list[int]  # generated ids, the final eos / stop token included
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    score: Optional[float] = None  # beam search: length-penalised log-probability
    alternatives: list["GenerationResult"] = field(default_factory=list)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)


def _is_chat(x) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)


def prompt_texts(bundle, inputs: Inputs, chat: Optional[bool] = None) -> list[str]:
    """The prompt strings for ``inputs`` (chats rendered with the bundle's template).

    ``chat=True`` also wraps plain strings as one user message each.
    """
    if isinstance(inputs, str) or _is_chat(inputs):
        inputs = [inputs]
    inputs = list(inputs)
    if not inputs:
        raise ValueError("prompts: give at least one prompt or chat")
    out = []
    for i, x in enumerate(inputs):
        if isinstance(x, str) and chat:
            x = [{"role": "user", "content": x}]
        if isinstance(x, str):
            out.append(x)
        elif _is_chat(x):
            out.append(render_bundle_chat(bundle, list(x)))
        else:
            raise ValueError(f"prompts[{i}]: expected a string or a list of {{'role', 'content'}} dicts, got {type(x).__name__}")
    return out


def encode_batch(bundle, texts: list[str], add_special_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids (B, T) and attention mask (B, T), 1 = real token."""
    rows = [bundle.tokenizer.encode(t, add_special_tokens=add_special_tokens).ids for t in texts]
    for i, r in enumerate(rows):
        if not r:
            raise ValueError(f"prompts[{i}]: encodes to no tokens")
    return left_pad(rows, pad_id=pad_id_for(bundle))


def left_pad(rows: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (B, T), mask (B, T)) with the padding on the left."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, T - len(r) :] = 1
    return ids, mask


def pad_id_for(bundle) -> int:
    """The id that fills padding: the tokenizer's pad token, else the first eos, else 0."""
    if bundle.pad_id is not None:
        return bundle.pad_id
    return bundle.eos_ids[0] if bundle.eos_ids else 0


def generate(
    bundle,
    prompts: Inputs,
    config: Optional[GenerationConfig] = None,
    chat: Optional[bool] = None,
    use_cache: bool = True,
) -> list[GenerationResult]:
    """Generate for each prompt or chat with a loaded ``ModelBundle``; one result per input."""
    config = config or GenerationConfig()
    texts = prompt_texts(bundle, prompts, chat)
    # A rendered chat already holds its special tokens, as HF's apply_chat_template(tokenize=True).
    is_chat = chat or _is_chat(prompts) or (not isinstance(prompts, str) and any(_is_chat(p) for p in prompts))
    ids, mask = encode_batch(bundle, texts, add_special_tokens=not is_chat)
    device = next(bundle.model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    eos = list(bundle.eos_ids)
    lens = mask.sum(1).tolist()

    if config.num_beams > 1:
        out = beam_search(bundle.model, ids, config, mask, eos_ids=eos, use_cache=use_cache, pad_id=pad_id_for(bundle))
        results = []
        for i, text in enumerate(texts):
            hyps = [
                _result(bundle, text, toks, reason, lens[i], config, score)
                for toks, reason, score in zip(out.tokens[i], out.finish_reasons[i], out.scores[i])
            ]
            hyps[0].alternatives = hyps[1:]
            results.append(hyps[0])
        return results

    base = config.sampling_params()
    # Row i samples from seed + i: rows differ, and a rerun reproduces every row.
    params = [base.replace(seed=None if base.seed is None else base.seed + i) for i in range(len(texts))]
    stop_fn = StopStrings(bundle.tokenizer, [p.stop for p in params])
    out = decode(bundle.model, ids, params, mask, eos_ids=eos, use_cache=use_cache, stop_fn=stop_fn or None)
    return [
        _result(bundle, text, toks, reason, lens[i], config)
        for i, (text, toks, reason) in enumerate(zip(texts, out.tokens, out.finish_reasons))
    ]


def _result(bundle, prompt, toks, reason, n_prompt, config, score=None) -> GenerationResult:
    ends = set(bundle.eos_ids) | set(config.stop_token_ids)
    body = toks[:-1] if toks and toks[-1] in ends else toks
    text = bundle.tokenizer.decode(body, skip_special_tokens=True)
    text, stopped = cut_at_stop(text, config.stop)
    return GenerationResult(
        prompt=prompt,
        text=text,
        token_ids=list(toks),
        finish_reason="stop" if stopped else reason,
        num_prompt_tokens=int(n_prompt),
        score=score,
    )
