"""Stop strings: end a sequence once its decoded text contains one, and cut the text before it.

The model produces tokens and a stop string may span several of them (or end inside one), so
the check runs on decoded text, not on ids. The output is cut *before* the stop string (the
OpenAI API convention; HF's ``stop_strings`` keeps it).
"""

from __future__ import annotations

from typing import Optional, Sequence


class StopStrings:
    """``stop_fn`` for ``sampling.decode``: row i stops when its text contains one of ``stops[i]``."""

    def __init__(self, tokenizer, stops: Sequence[Sequence[str]]):
        self.tokenizer = tokenizer
        self.stops = [list(s) for s in stops]
        self.longest = max((len(s) for row in self.stops for s in row), default=0)

    def __bool__(self) -> bool:
        return any(self.stops)

    def __call__(self, row: int, tokens: list[int]) -> bool:
        if not self.stops[row]:
            return False
        # Only the last few tokens can complete a stop string that was absent one step earlier;
        # decoding the tail (longest stop + a margin, in tokens) keeps this O(1) per step.
        tail = self.tokenizer.decode(tokens[-(self.longest + 8) :], skip_special_tokens=True)
        return any(s in tail for s in self.stops[row])


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the earliest stop string, whether one was found)."""
    first: Optional[int] = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (first is None or i < first):
            first = i
    return (text, False) if first is None else (text[:first], True)
