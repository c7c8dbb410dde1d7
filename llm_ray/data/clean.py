"""Text clean-up and quality filters (recipe section ``prepare.clean``).

``normalize_text`` makes equal-looking text equal (Unicode form, whitespace, line endings,
invisible control characters) so exact dedup and the filters see the text the model will see.
``quality_reason`` names the first filter a document fails; a filtered document is a counted
outcome of the recipe's thresholds, not a reject of malformed input.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Optional

import numpy as np

from llm_ray.config.prepare import CleanConfig

FILTERS = ("too_short", "too_long", "repeated_lines", "symbol_ratio")

# Everything str.splitlines() treats as a line break becomes "\n": a form feed or U+2028 in
# the middle of a line would otherwise survive as an invisible break the tokenizer sees.
_LINE_BREAKS = re.compile(r"\r\n|[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
_TRAILING_SPACE = re.compile(r"[^\S\n]+(?=\n|$)")
_SPACE_RUNS = re.compile(r"[^\S\n]+")  # any whitespace but newline: tabs, NBSP, U+3000, ...
_NEWLINE_RUNS = re.compile(r"\n{3,}")
# Joiners are format characters (Cf) that carry meaning: ZWNJ in Persian and Indic scripts,
# ZWJ in emoji sequences. The other Cf (BOM, zero-width space, soft hyphen, bidi controls)
# are invisible noise.
_KEEP = {"\n", "\t", "\u200c", "\u200d"}
_CANDIDATE_SYMBOL = re.compile(r"[^\w\s]|_")


@functools.cache
def _control_chars() -> re.Pattern:
    """One character class of all Cc/Cf/Cs code points but ``_KEEP``, built once per process.

    Only planes 0-2 and 14 are scanned: the others hold no control or format characters
    (CJK extensions, private use, unassigned), and skipping them makes the build ~0.1 s.
    """
    ranges, start, prev = [], None, None
    for cp in itertools.chain(range(0x30000), range(0xE0000, 0xF0000)):
        ch = chr(cp)
        drop = unicodedata.category(ch) in ("Cc", "Cf", "Cs") and ch not in _KEEP
        if start is not None and (not drop or cp != prev + 1):
            ranges.append((start, prev))  # a run ends at a kept character or a scan gap
            start = None
        if drop and start is None:
            start = cp
        prev = cp
    if start is not None:
        ranges.append((start, prev))
    cls = "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)
    return re.compile(f"[{cls}]+")


def normalize_text(text: str, unicode_form: str = "NFKC") -> str:
    """Unicode form (NFC, NFKC or "none"), "\n" line endings, control and invisible format
    characters removed, whitespace runs within a line collapsed to one space, trailing spaces
    dropped, at most one blank line in a row, ends stripped. U+FFFD is kept: it marks where the
    source had an undecodable byte, and removing it would splice words together."""
    if unicode_form != "none":
        text = unicodedata.normalize(unicode_form, text)
    # Python's ``re`` tries the whitespace patterns below at every position (they match single
    # spaces), ~0.15 us a character; each step runs only when a substring test (C speed) shows
    # it has something to do: same result, ~3x faster on typical text.
    if any(c in text for c in _BREAK_CHARS):
        text = _LINE_BREAKS.sub("\n", text)
    ascii_only = text.isascii()  # O(1) in CPython
    text = (_ASCII_CONTROL if ascii_only else _control_chars()).sub("", text)
    # after the two steps above, ASCII whitespace is only space, tab and newline
    odd = "\t" in text if ascii_only else _ODD_SPACE.search(text) is not None
    if odd or " \n" in text or text.endswith(" "):
        text = _TRAILING_SPACE.sub("", text)
    if odd or "  " in text:
        text = _SPACE_RUNS.sub(" ", text)
    if "\n\n\n" in text:
        text = _NEWLINE_RUNS.sub("\n\n", text)
    return text.strip()


_BREAK_CHARS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"  # what _LINE_BREAKS replaces
_ASCII_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]+")  # the Cc characters of ASCII but \n and \t
# whitespace (what \s matches, str.isspace) other than space and newline: tab, NBSP, U+3000, ...
_ODD_SPACE = re.compile("[" + "".join(re.escape(chr(c)) for c in range(0x3001) if chr(c).isspace() and chr(c) not in " \n") + "]")  # U+3000 is the last
_ASCII_ALNUM_SPACE = bytes(range(48, 58)) + bytes(range(65, 91)) + bytes(range(97, 123)) + b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"


def repeated_line_ratio(text: str) -> float:
    """Share of non-empty lines that repeat an earlier line (boilerplate, menus, spam)."""
    seen: set[str] = set()
    lines = repeats = 0
    for line in text.split("\n"):
        line = line.strip()
        if not line:
            continue
        lines += 1
        if line in seen:
            repeats += 1
        seen.add(line)
    return repeats / lines if lines else 0.0


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither alphanumeric nor whitespace.

    Combining marks (Unicode category M) count as letters: Devanagari vowel signs, for one,
    are not ``isalnum()`` and would otherwise push ordinary Hindi text over the threshold.
    """
    if not text:
        return 0.0
    if text.isascii():  # no combining marks: delete letters, digits, whitespace in C and count the rest
        return len(text.encode().translate(None, _ASCII_ALNUM_SPACE)) / len(text)
    symbols = sum(1 for m in _CANDIDATE_SYMBOL.finditer(text) if not unicodedata.category(m.group())[0] == "M")
    return symbols / len(text)


def quality_reason(text: str, cfg: CleanConfig) -> Optional[str]:
    """None if ``text`` passes every filter, else the name of the first failing one."""
    if len(text) < cfg.min_chars:
        return "too_short"
    if len(text) > cfg.max_chars:
        return "too_long"
    if repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return "repeated_lines"
    if symbol_ratio(text) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    return None


def clean_batch(batch: Mapping[str, Sequence], cfg: CleanConfig, text_column: str = "text") -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches`` function (``batch_format="numpy"``, Ray's default).

    Returns every row, with ``text`` normalized and a ``drop_reason`` column: "" for a kept row,
    else a name from ``FILTERS``. Rows are not dropped here so the caller can count outcomes
    per reason (and audit them) before ``filter``-ing on ``drop_reason == ""``. Other columns
    pass through unchanged.
    """
    texts = [normalize_text(str(t), cfg.unicode_form) for t in batch[text_column]]
    out = {k: np.asarray(v) for k, v in batch.items()}
    out[text_column] = np.array(texts, dtype=object)
    out["drop_reason"] = np.array([quality_reason(t, cfg) or "" for t in texts], dtype=object)
    return out
