"""Rule rewards for ``align.ppo.reward.function`` (TRL's signature: ``fn(prompts, completions,
**columns) -> list[float]``): tasks with a known answer, for recipes, tests and the bench.
A user's own function lives in their module and is named the same way, ``module:function``."""

from __future__ import annotations

import re


def letter_share(prompts, completions, letter: str = "e", **columns) -> list[float]:
    """The share of a completion's letters that are ``letter`` (dense: every token counts)."""
    out = []
    for text in completions:
        letters = [ch for ch in text.lower() if ch.isalpha()]
        out.append(sum(ch == letter for ch in letters) / len(letters) if letters else 0.0)
    return out


def contains_word(prompts, completions, word=None, **columns) -> list[float]:
    """1 when the completion contains the record's ``word`` column as a whole word, else 0."""
    words = word if isinstance(word, list) else [word] * len(completions)
    return [float(bool(w) and re.search(rf"\b{re.escape(str(w))}\b", text, re.IGNORECASE) is not None)
            for w, text in zip(words, completions)]


def distinct_share(prompts, completions, **columns) -> list[float]:
    """The share of a completion's words that are distinct: a judge for ``contains_word``, whose
    cheapest hack is repeating the word."""
    out = []
    for text in completions:
        words = re.findall(r"\w+", text.lower())
        out.append(len(set(words)) / len(words) if words else 0.0)
    return out
