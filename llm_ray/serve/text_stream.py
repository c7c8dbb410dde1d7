"""Token ids -> text deltas for streaming, with OpenAI stop strings.

Incremental detokenization is ``tokenizers.decoders.DecodeStream`` (the Rust library's own, the
prefix/read-offset scheme vLLM uses): each new token decodes together with the previous chunk's
tokens only (their text is the context that leading-space and merge rules need), and the
difference is the new text, so a token costs two short decodes instead of decoding the whole
output again (O(n) per request, not O(n^2)); ids whose text ends in an incomplete UTF-8 sequence
(U+FFFD) wait for the next token. On our BPE, WordPiece and SmolLM2 tokenizers its deltas add up
to ``tokenizer.decode(all ids)`` (tests/test_serve.py decides, multi-byte text and random ids).
It raises where a decoder's cleanup rewrites text already handed out (the new decode no longer
starts with the old: "InvalidPrefix"), and it needs a ``tokenizers.Tokenizer``; there, and for
any other tokenizer object, the same scheme runs here in Python, holding such text back instead.

On top: any tail that could still become a stop string is held back, and a stop string ends the
generation and is cut from the output, as in the OpenAI API. The concatenated deltas equal the
non-streamed answer.
"""

from __future__ import annotations

import re

from tokenizers import Tokenizer
from tokenizers.decoders import ByteLevel, DecodeStream


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # decode(ids[: self._read])
        self._prefix = 0  # ids[_prefix:_read]: the last decoded chunk, context for the next one
        self._read = 0
        self.sent = ""  # text handed out so far
        self.stopped = False  # a stop string was found: generation must end
        self._library = DecodeStream(skip_special_tokens=True) if isinstance(tokenizer, Tokenizer) else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self) -> None:
        """Extend ``text`` with the ids past ``_read`` once they decode to whole characters."""
        if self._library is not None:
            try:
                chunk = self._library.step(self.tokenizer, self.ids[-1])
            except Exception:  # InvalidPrefix: from here on, the Python scheme below
                self._library = None
            else:
                if chunk:
                    self.text += chunk
                    self._prefix, self._read = self._read, len(self.ids)
                return
        before = self._decode(self.ids[self._prefix : self._read])
        after = self._decode(self.ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.text += after[len(before) :]
            self._prefix, self._read = self._read, len(self.ids)

    def _cut_at_stop(self, text: str) -> str:
        """Text before the earliest stop string (sets ``stopped``), or the text unchanged."""
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            return text[: min(hits)]
        return text

    def _safe_len(self, text: str) -> int:
        """Length of the prefix of ``text`` that no later token can change into a stop string."""
        keep = len(text)
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    keep = min(keep, len(text) - k)
                    break
        return keep

    def push(self, token_id: int) -> str:
        """Add a token; return the new text that can be sent now ('' if none yet)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        self._decode_new()
        text = self._cut_at_stop(self.text)
        if not self.stopped:
            text = text[: self._safe_len(text)]
        return self._advance(text)

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        return self._advance(self.final_text())

    def final_text(self) -> str:
        """The whole answer: decoded output, cut before the first stop string."""
        return self._cut_at_stop(self._decode(self.ids))

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (``tokenizers``' ByteLevel uses the same map but
    does not expose it), inverted: stand-in character -> byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return {c: b for b, c in chars.items()}


_BYTE_OF = _byte_level_alphabet()
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece-style byte tokens


class TokenBytes:
    """The UTF-8 bytes one token stands for (OpenAI's ``logprobs[].bytes``). ``decode([id])``
    alone gives U+FFFD for a token holding part of a multi-byte character; a byte-level BPE
    token's own string maps back to its exact bytes, as does a ``<0xNN>`` byte-fallback token."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = isinstance(getattr(tokenizer, "decoder", None), ByteLevel)

    def __call__(self, token_id: int) -> list[int]:
        piece = self.tokenizer.id_to_token(token_id) if hasattr(self.tokenizer, "id_to_token") else None
        if piece is not None:
            m = _BYTE_FALLBACK.fullmatch(piece)
            if m:
                return [int(m.group(1), 16)]
            special = self.tokenizer.decode([token_id], skip_special_tokens=True) == ""
            if self.byte_level and not special and all(c in _BYTE_OF for c in piece):
                return [_BYTE_OF[c] for c in piece]
        return list(self.tokenizer.decode([token_id], skip_special_tokens=True).encode("utf-8"))
