"""PII scrubbing: typed placeholders for real PII; look-alikes (Luhn-invalid cards, years,
versions, dates, out-of-range IPs) untouched."""

from __future__ import annotations

import numpy as np
import pytest

from llm_ray.config.prepare import PIIConfig
from llm_ray.data.pii import luhn_valid, scrub_batch, scrub_pii

CFG = PIIConfig()


@pytest.mark.parametrize(
    "digits, valid",
    [
        ("4111111111111111", True),  # Visa test number
        ("5555555555554444", True),  # Mastercard
        ("378282246310005", True),  # Amex
        ("6011111111111117", True),  # Discover
        ("4111111111111112", False),
        ("1234567812345678", False),
        ("", False),
    ],
)
def test_luhn(digits, valid):
    assert luhn_valid(digits) is valid


@pytest.mark.parametrize(
    "text, expected, kind",
    [
        ("mail jane.doe+news@mail.example.co.uk today", "mail <EMAIL> today", "email"),
        ("<a@b.io>, x_y@host-1.org.", "<<EMAIL>>, <EMAIL>.", "email"),
        ("card 4111 1111 1111 1111.", "card <CREDIT_CARD>.", "credit_card"),
        ("card 4111-1111-1111-1111 exp 12/25", "card <CREDIT_CARD> exp 12/25", "credit_card"),
        ("pay 5555555555554444 now", "pay <CREDIT_CARD> now", "credit_card"),
        ("amex 3782 822463 10005", "amex <CREDIT_CARD>", "credit_card"),
        ("call (555) 123-4567", "call <PHONE>", "phone"),
        ("call 555-123-4567 or 555.123.4567", "call <PHONE> or <PHONE>", "phone"),
        ("call 1-800-555-1234", "call <PHONE>", "phone"),
        ("ring +44 20 7946 0958, ok", "ring <PHONE>, ok", "phone"),
        ("ring +1 (555) 123-4567", "ring <PHONE>", "phone"),
        ("ring +8613812345678", "ring <PHONE>", "phone"),
        ("ring 020 7946 0958", "ring <PHONE>", "phone"),
        ("appelez 01 23 45 67 89", "appelez <PHONE>", "phone"),
        ("host 192.168.1.1.", "host <IP_ADDRESS>.", "ip_address"),
        ("from 10.0.0.255:8080", "from <IP_ADDRESS>:8080", "ip_address"),
        ("v6 2001:0db8:85a3:0000:0000:8a2e:0370:7334 up", "v6 <IP_ADDRESS> up", "ip_address"),
        ("v6 fe80::1 and ::ffff:192.168.1.1", "v6 <IP_ADDRESS> and <IP_ADDRESS>", "ip_address"),
    ],
)
def test_pii_scrubbed(text, expected, kind):
    out, counts = scrub_pii(text, CFG)
    assert out == expected
    assert counts[kind] == expected.count(f"<{kind.upper()}>") and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize(
    "text",
    [
        "card 4111 1111 1111 1112 fails Luhn",  # Luhn-invalid: left alone, not read as a phone either
        "id 4111111111111112",
        "ts 1700000000008 is Luhn-valid but no card starts with 1",
        "order 12345678901234567890 has 20 digits",
        "In 2024 we released 3.11.7 and 1.2.3 on 2024-01-15 (15/01/2024, 15.01.2024).",
        "Python 3.11 sold 1500 copies, 1,234,567.89 dollars, SSN-like 123-45-6789",
        "isbn 978-3-16-148410-0 at 12:30:45",
        "not ips: 999.1.1.1, 10.0.0.256, 1.2.3.4.5, v1.2.3.4",
        "not v6: std::vector, x :: Int, ::1, 00:1A:2B:3C:4D:5E",
        "not mail: user@localhost, @handle, a@b",
    ],
)
def test_lookalikes_untouched(text):
    out, counts = scrub_pii(text, CFG)
    assert out == text and sum(counts.values()) == 0


def test_card_counted_as_card_not_phone():
    out, counts = scrub_pii("4111 1111 1111 1111 and 555-123-4567 and a@b.com and 8.8.8.8", CFG)
    assert out == "<CREDIT_CARD> and <PHONE> and <EMAIL> and <IP_ADDRESS>"
    assert counts == {"email": 1, "phone": 1, "ip_address": 1, "credit_card": 1}


def test_config_switches():
    text = "a@b.com 555-123-4567 8.8.8.8 4111111111111111"
    assert scrub_pii(text, PIIConfig(enabled=False)) == (text, {"email": 0, "phone": 0, "ip_address": 0, "credit_card": 0})
    out, counts = scrub_pii(text, PIIConfig(emails=False, credit_cards=False))
    assert out == "a@b.com <PHONE> <IP_ADDRESS> 4111111111111111"
    assert counts == {"email": 0, "phone": 1, "ip_address": 1, "credit_card": 0}


def test_scrub_batch_counts_per_row():
    texts = np.array(["x@y.org and z@y.org", "clean"], dtype=object)
    batch = {"doc_id": np.array(["d#1", "d#2"], dtype=object), "text": texts}
    out = scrub_batch(batch, CFG)
    assert list(out["text"]) == ["<EMAIL> and <EMAIL>", "clean"]
    assert list(out["pii_email"]) == [2, 0] and list(out["pii_phone"]) == [0, 0]
    assert list(out["doc_id"]) == ["d#1", "d#2"]
