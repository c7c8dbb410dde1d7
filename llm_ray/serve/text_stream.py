"""Token ids -> text deltas for streaming, with OpenAI stop strings.

The text so far is always ``tokenizer.decode(all ids)``, so the concatenated deltas equal the
non-streamed answer. Held back until the next token: text ending in an incomplete UTF-8
sequence (decoded as U+FFFD) and any tail that could still become a stop string. A stop string
ends the generation and is cut from the output, as in the OpenAI API.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""  # text handed out so far
        self.stopped = False  # a stop string was found: generation must end

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)

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
        text = self._cut_at_stop(self._decode())
        if not self.stopped:
            if text.endswith("\ufffd"):
                return ""  # a multi-byte character is split across tokens
            text = text[: self._safe_len(text)]
        return self._advance(text)

    def finish(self) -> str:
        """The text still held back once generation has ended."""
        return self._advance(self.final_text())

    def final_text(self) -> str:
        """The whole answer: decoded output, cut before the first stop string."""
        return self._cut_at_stop(self._decode())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta
