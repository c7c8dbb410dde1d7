"""Token ids -> text deltas for streaming, with OpenAI stop strings.

Incremental detokenization as vLLM does it: each new token decodes together with the previous
chunk's tokens only (their text is the context that leading-space and merge rules need), and the
difference is the new text, so a token costs two short decodes instead of decoding the whole
output again (O(n) per request, not O(n^2)). The text so far equals ``tokenizer.decode(all
ids)``; the concatenated deltas equal the non-streamed answer. Held back until the next token:
ids whose text ends in an incomplete UTF-8 sequence (decoded as U+FFFD) and any tail that could
still become a stop string. A stop string ends the generation and is cut from the output, as in
the OpenAI API.
"""

from __future__ import annotations


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

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _decode_new(self) -> None:
        """Extend ``text`` with the ids past ``_read`` once they decode to whole characters."""
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
