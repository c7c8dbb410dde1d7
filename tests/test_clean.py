"""Text clean-up and the quality filters of ``prepare.clean``."""

from __future__ import annotations

import numpy as np
import pytest

from llm_ray.config.prepare import CleanConfig
from llm_ray.data.clean import FILTERS, clean_batch, normalize_text, quality_reason, repeated_line_ratio, symbol_ratio

EMOJI_FAMILY = "family \U0001f468\u200d\U0001f469\u200d\U0001f467"
PERSIAN = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"


@pytest.mark.parametrize(
    "raw, form, expected",
    [
        ("\ufb01ne caf\u00e9", "NFKC", "fine café"),  # ligature folded
        ("\ufb01ne", "NFC", "\ufb01ne"),  # NFC keeps compatibility characters
        ("cafe\u0301", "NFC", "caf\u00e9"),  # combining accent composed
        ("cafe\u0301", "none", "cafe\u0301"),
        ("a\x00b\x07c\u200bd\ufeffe\u00adf", "NFKC", "abcdef"),  # controls, zero-width, BOM, soft hyphen
        ("one\r\ntwo\rthree\u2028four\x0cfive", "NFKC", "one\ntwo\nthree\nfour\nfive"),
        ("a  \t  b\u3000\u3000c", "NFC", "a b c"),  # runs of spaces, tabs, ideographic spaces
        ("line   \nnext\t\n", "NFKC", "line\nnext"),  # trailing spaces per line
        ("p1\n\n\n\n\np2\n \n \n\np3", "NFKC", "p1\n\np2\n\np3"),  # at most one blank line
        ("  \n\n padded \n\n ", "NFKC", "padded"),
        ("bad \ufffd byte", "NFKC", "bad \ufffd byte"),  # U+FFFD marks lost bytes: kept
        (EMOJI_FAMILY, "NFKC", EMOJI_FAMILY),  # ZWJ joins the emoji: kept
        (PERSIAN, "NFC", PERSIAN),  # ZWNJ is part of the spelling: kept
    ],
)
def test_normalize_text(raw, form, expected):
    assert normalize_text(raw, form) == expected


def test_normalize_is_idempotent():
    text = "  Hello\t\tworld \r\n\r\n\r\n\x01 caf\u0065\u0301 \ufb01 \n"
    once = normalize_text(text, "NFKC")
    assert normalize_text(once, "NFKC") == once


CFG = CleanConfig(min_chars=20, max_chars=400, max_repeated_line_ratio=0.3, max_symbol_ratio=0.25)
PROSE = "The quick brown fox jumps over the lazy dog.\nA second, different line of prose follows here."


@pytest.mark.parametrize(
    "text, reason",
    [
        (PROSE, None),
        ("too short", "too_short"),
        ("word " * 100, "too_long"),
        ("\n".join(["Home | About | Contact"] * 3 + ["real content line one", "real content line two"]), "repeated_lines"),
        ("#### $$$ %%% &&& *** @@@ !!! ~~~ {{{ }}} ok", "symbol_ratio"),
    ],
)
def test_quality_filters(text, reason):
    assert quality_reason(text, CFG) == reason


def test_filter_thresholds_are_inclusive_limits():
    lines = "\n".join(["a line", "another line", "a third line", "a line", "", "more text", "yet more", "last one", "x", "y", "z"])
    assert repeated_line_ratio(lines) == pytest.approx(0.1)  # 1 repeat among 10 non-empty lines
    assert quality_reason(lines, CleanConfig(min_chars=0, max_repeated_line_ratio=0.1)) is None
    assert quality_reason(lines, CleanConfig(min_chars=0, max_repeated_line_ratio=0.09)) == "repeated_lines"
    assert symbol_ratio("ab!!") == 0.5
    assert quality_reason("ab!!", CleanConfig(min_chars=0, max_symbol_ratio=0.5)) is None
    assert quality_reason("ab!!", CleanConfig(min_chars=0, max_symbol_ratio=0.49)) == "symbol_ratio"


def test_symbol_ratio_counts_marks_as_letters_not_symbols():
    hindi = "हिन्दी भारत की एक प्रमुख भाषा है और इसे करोड़ों लोग बोलते हैं"
    assert symbol_ratio(hindi) == 0.0
    assert quality_reason(hindi, CFG) is None
    assert symbol_ratio("snake_case_name") == pytest.approx(2 / 15)  # underscore is a symbol


def test_clean_batch_marks_reasons_and_passes_columns_through():
    batch = {
        "doc_id": np.array(["a#1", "a#2", "a#3"], dtype=object),
        "line": np.array([1, 2, 3]),
        "text": np.array(["  " + PROSE.replace(" ", "\t ") + "  ", "short", "\x00" * 50], dtype=object),
    }
    out = clean_batch(batch, CFG)
    assert list(out["drop_reason"]) == ["", "too_short", "too_short"]
    assert out["text"][0] == PROSE
    assert list(out["doc_id"]) == ["a#1", "a#2", "a#3"] and list(out["line"]) == [1, 2, 3]
    assert set(out["drop_reason"]) - {""} <= set(FILTERS)
