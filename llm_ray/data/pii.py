"""PII scrubbing (recipe section ``prepare.pii``): typed placeholders instead of the values.

Order matters: e-mails first (their local part may hold digits), then card numbers (so a card
is not read as a phone number), then IPv6 (it may embed an IPv4), IPv4, and phones last.
Every pattern refuses to start or end inside a longer run of digits, so years ("2024"),
versions ("3.11.7"), dates and long numeric IDs stay as they are. Patterns compile once, at
import.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence

import numpy as np

from llm_ray.config.prepare import PIIConfig

PLACEHOLDERS = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "ip_address": "<IP_ADDRESS>",
    "credit_card": "<CREDIT_CARD>",
}

_EMAIL = re.compile(
    r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@"
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])"
)

# 13-19 digits, contiguous or in groups split by one kind of separator: 4-4-4-4(-3) for most
# brands, 4-6-5 (Amex) and 4-6-4 (Diners). Luhn and the issuer digit are checked afterwards.
_CARD = re.compile(
    r"(?<![\w.])(?:"
    r"\d{13,19}"
    r"|\d{4}(?P<s>[ -])\d{4}(?P=s)\d{4}(?P=s)\d{1,4}(?:(?P=s)\d{1,3})?"
    r"|\d{4}(?P<a>[ -])\d{6}(?P=a)\d{4,5}"
    r")(?![\w])(?!\.\d)"
)

_IPV4 = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w])(?!\.\d)"
)
# A loose candidate (hex groups and colons, optionally an IPv4 tail); ipaddress decides.
_IPV6 = re.compile(
    r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,8}(?:\d{1,3}(?:\.\d{1,3}){3}|[0-9A-Fa-f]{1,4})?(?![\w:])(?!\.\d)"
)

# Phones end where no further digit group follows, so a longer number is never cut into one.
_PHONE_END = r"(?![\w])(?![ .-]?\d)"
_PHONES = [
    # International: +CC then groups split by space, dot or dash, optionally "(0)" or "(20)".
    (re.compile(r"(?<![\w+])\+(?:\d{8,15}|\d{1,3}(?:[ .-]?\(\d{1,4}\)|[ .-]\d{1,8}){1,6})" + _PHONE_END), 8, 15),
    # North American: (555) 123-4567, 555-123-4567, 555.123.4567, 1-800-555-1234.
    (
        re.compile(
            r"(?<![\w.+-])(?:1[ .-])?(?:\(\d{3}\)[ ]?\d{3}[ .-]\d{4}|\d{3}(?P<s>[ .-])\d{3}(?P=s)\d{4})" + _PHONE_END
        ),
        10,
        11,
    ),
    # National with a trunk 0: 020 7946 0958, (030) 1234 5678, 01 23 45 67 89.
    (
        re.compile(
            r"(?<![\w.+-])(?:\(0\d{1,4}\)|0\d{1,4})[ -]\d{3,4}[ -]?\d{3,4}" + _PHONE_END
            + r"|(?<![\w.+-])0\d(?P<f>[ .])\d{2}(?P=f)\d{2}(?P=f)\d{2}(?P=f)\d{2}" + _PHONE_END
        ),
        9,
        12,
    ),
]


def luhn_valid(digits: str) -> bool:
    """The Luhn checksum every payment card number carries (non-digits are ignored)."""
    nums = [int(c) for c in digits if c.isdigit()]
    if not nums:
        return False
    total = 0
    for i, d in enumerate(reversed(nums)):
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


def _is_card(match: str) -> bool:
    digits = _digits(match)
    # Issuers' first digits are 2-6 (Mastercard 2-series, Amex/Diners/JCB 3, Visa 4,
    # Mastercard 5, Discover/UnionPay/Maestro 6). The check keeps Luhn's 1-in-10 false hits
    # off other long numbers, e.g. millisecond timestamps, which start with 1.
    return 13 <= len(digits) <= 19 and digits[0] in "23456" and luhn_valid(digits)


def _is_ipv6(match: str) -> bool:
    # At least two non-empty groups: "::" (Haskell's type colon) and "::1" are not personal.
    if sum(1 for g in re.split(r"[:.]", match) if g) < 2:
        return False
    try:
        ipaddress.IPv6Address(match)
        return True
    except ValueError:
        return False


# Necessary conditions, one per pattern, tested before it: Python's ``re`` cannot skip ahead to
# a pattern that begins with a lookbehind, so each scan costs ~0.15 us per character even on
# text with nothing to find, while these simpler tests are 3-20x faster (for ASCII text \d is
# [0-9], which ``re`` can skip to). Each holds for every string the pattern can match, so results are
# unchanged.
_UNICODE_GATES = {"card": re.compile(r"\d{4}"), "ipv4": re.compile(r"\d\.\d"), "phone1": re.compile(r"\d{3}[ .-]\d{4}")}
_ASCII_GATES = {k: re.compile(g.pattern.replace("\\d", "[0-9]")) for k, g in _UNICODE_GATES.items()}
_HAS_ZERO_DIGIT = re.compile(r"0\d")


def _may_match(kind: str, text: str) -> bool:
    if kind == "email":
        return "@" in text
    if kind == "ipv6":
        return text.count(":") >= 2
    if kind == "phone0":
        return "+" in text
    if kind == "phone2":
        return _HAS_ZERO_DIGIT.search(text) is not None
    gates = _ASCII_GATES if text.isascii() else _UNICODE_GATES
    return gates[kind].search(text) is not None


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, dict[str, int]]:
    """``text`` with PII replaced by placeholders, and how many of each kind were replaced."""
    counts = dict.fromkeys(PLACEHOLDERS, 0)
    if not cfg.enabled:
        return text, counts

    def sub(pattern: re.Pattern, kind: str, text: str, accept=None) -> str:
        def repl(m: re.Match) -> str:
            if accept is not None and not accept(m.group()):
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        return pattern.sub(repl, text)

    if cfg.emails and _may_match("email", text):
        text = sub(_EMAIL, "email", text)
    if cfg.credit_cards and _may_match("card", text):
        text = sub(_CARD, "credit_card", text, _is_card)
    if cfg.ip_addresses:
        if _may_match("ipv6", text):
            text = sub(_IPV6, "ip_address", text, _is_ipv6)
        if _may_match("ipv4", text):
            text = sub(_IPV4, "ip_address", text)
    if cfg.phones:
        for i, (pattern, lo, hi) in enumerate(_PHONES):
            if _may_match(f"phone{i}", text):
                text = sub(pattern, "phone", text, lambda s, lo=lo, hi=hi: lo <= len(_digits(s)) <= hi)
    return text, counts


def scrub_batch(batch: Mapping[str, Sequence], cfg: PIIConfig, text_column: str = "text") -> dict[str, np.ndarray]:
    """A Ray Data ``map_batches`` function (``batch_format="numpy"``, Ray's default): ``text``
    scrubbed, plus int64 columns ``pii_email``, ``pii_phone``, ``pii_ip_address`` and
    ``pii_credit_card`` with per-row counts for the caller to sum. Other columns pass through."""
    out = {k: np.asarray(v) for k, v in batch.items()}
    texts, per_kind = [], {k: [] for k in PLACEHOLDERS}
    for t in batch[text_column]:
        scrubbed, counts = scrub_pii(str(t), cfg)
        texts.append(scrubbed)
        for k, n in counts.items():
            per_kind[k].append(n)
    out[text_column] = np.array(texts, dtype=object)
    for k, ns in per_kind.items():
        out[f"pii_{k}"] = np.array(ns, dtype=np.int64)
    return out
