"""Prompt templates: zero-shot, few-shot with k demonstrations, and chain of thought.

A template is a ``str.format`` string over the example's fields plus ``target`` (the answer
text of a demonstration). Chain of thought follows zero-shot-CoT (Kojima et al. 2022) in two
stages: the question with ``cot_trigger`` makes the model write its reasoning; the question,
the reasoning and ``answer_trigger`` then lead to the answer. With ``k > 0`` the cot style also
shows k worked demonstrations whose reasoning is their ``rationale`` field.
"""

from __future__ import annotations

import random
import string
from typing import Optional

from llm_ray.config.eval import PromptConfig


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(template: str, record: dict, what: str = "template") -> str:
    """``template.format(**record)`` with an error that names the missing field."""
    missing = [f for f in template_fields(template) if f not in record]
    if missing:
        raise KeyError(f"prompt.{what} {template!r} needs field(s) {missing}; the example has {sorted(record)}")
    return template.format(**record)


def select_shots(pool: list[dict], k: int, seed: int, exclude: Optional[int] = None) -> list[dict]:
    """k demonstrations drawn from ``pool`` without ``pool[exclude]`` (the example itself when
    the shots come from the task's own data); the same seed and example give the same shots."""
    candidates = [r for i, r in enumerate(pool) if i != exclude]
    if len(candidates) < k:
        raise ValueError(f"prompt.k = {k} demonstrations requested but only {len(candidates)} available")
    rng = random.Random(f"{seed}:{exclude}")
    return rng.sample(candidates, k)


def demonstration(cfg: PromptConfig, shot: dict) -> str:
    text = render(cfg.template, shot)
    if cfg.style == "cot":
        if "rationale" not in shot:
            raise KeyError("prompt.style cot with k > 0 needs a 'rationale' field in every demonstration")
        text += cfg.cot_trigger + " " + str(shot["rationale"]) + cfg.answer_trigger
    return text + render(cfg.target_template, shot, "target_template")


def build_prompt(cfg: PromptConfig, example: dict, shots: list[dict] = ()) -> str:
    """The prompt the model continues: instruction, demonstrations, then the question.

    For ``cot`` this is the first stage (ending in ``cot_trigger``); see ``answer_prompt``.
    """
    parts = [cfg.instruction] if cfg.instruction else []
    parts += [demonstration(cfg, s) for s in shots]
    question = render(cfg.template, example)
    if cfg.style == "cot":
        question += cfg.cot_trigger
    parts.append(question)
    return cfg.separator.join(parts)


def answer_prompt(cfg: PromptConfig, first_stage: str, reasoning: str) -> str:
    """Second chain-of-thought stage: the first prompt, the model's reasoning, the answer trigger."""
    return first_stage + " " + reasoning.strip() + cfg.answer_trigger


def prompts_for(cfg: PromptConfig, examples: list[dict], shot_pool: Optional[list[dict]] = None) -> list[str]:
    """One prompt per example. Demonstrations come from ``shot_pool`` (``prompt.shots``) when
    given, else from the other examples of the task."""
    k = cfg.k if cfg.style in ("few_shot", "cot") else 0
    out = []
    for i, ex in enumerate(examples):
        shots = []
        if k:
            pool, exclude = (shot_pool, None) if shot_pool is not None else (examples, i)
            shots = select_shots(pool, k, cfg.seed, exclude)
        out.append(build_prompt(cfg, ex, shots))
    return out
