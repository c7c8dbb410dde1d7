"""Constrained decoding: OpenAI's ``response_format`` (``json_object``, ``json_schema``) as a
per-request logits processor over llguidance.

Why llguidance (among xgrammar, llguidance and outlines-core, all maintained and on the
registry): one small abi3 wheel with no dependency (no torch pin, no transformers), it builds
the token trie straight from our ``tokenizers`` JSON, computes a token mask on the CPU in well
under a millisecond per step for JSON grammars, and is what vLLM and llama.cpp also ship.
Its ``llguidance.torch`` helpers are not used: their mask kernel is ``torch.compile``d (a
compile on first use on CPU); unpacking the bitmask with numpy costs microseconds.

    tok = grammar_tokenizer(tokenizer, eos_ids)        # once per model (about a second)
    proc = JsonConstraint(tok, schema=None | {...})    # per request (per choice)
    logits_row = proc(generated_ids, logits_row)       # each step: consume the last token, mask
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np
import torch


COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_tokenizer(tokenizer, eos_ids: list[int]):
    """An ``llguidance.LLTokenizer`` for a ``tokenizers.Tokenizer`` (expensive: build once)."""
    import llguidance

    return llguidance.LLTokenizer(tokenizer.to_str(), eos_token=list(eos_ids) or None)


def json_grammar(schema: Optional[dict]) -> str:
    """The llguidance grammar for a JSON schema, or any JSON object when ``schema`` is None.
    Raises ValueError naming what is wrong with the schema."""
    from llguidance import LLMatcher

    body = {"type": "object"} if schema is None else dict(schema)
    try:
        # No free whitespace between tokens: small models otherwise fill the budget with
        # newlines (a known failure of flexible-whitespace JSON grammars); a schema's own
        # "x-guidance" options still override this default.
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(body), defaults=COMPACT)
    except Exception as e:  # llguidance raises ValueError/RuntimeError for unsupported schemas
        raise ValueError(f"the JSON schema cannot be compiled: {e}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise ValueError(f"the JSON schema cannot be compiled: {'; '.join(messages)}")
    return grammar


class JsonConstraint:
    """Masks every token the grammar does not allow next; after the JSON is complete only the
    end of sequence is allowed. Stateful: one instance per generated sequence."""

    def __init__(self, ll_tokenizer, grammar: str):
        from llguidance import LLMatcher

        self.matcher = LLMatcher(ll_tokenizer, grammar, log_level=0)
        self.vocab = ll_tokenizer.vocab_size
        self.consumed = 0
        if self.matcher.is_error():
            raise ValueError(f"grammar: {self.matcher.get_error()}")

    def __call__(self, generated: list[int], logits: torch.Tensor) -> torch.Tensor:  # (V,) -> (V,)
        for tok in generated[self.consumed :]:
            if not self.matcher.consume_token(tok):
                raise RuntimeError(f"grammar: token {tok} was not allowed: {self.matcher.get_error()}")
        self.consumed = len(generated)
        words = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint32)
        allowed = np.unpackbits(words.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)
        V = logits.shape[0]
        mask = torch.zeros(V, dtype=torch.bool, device=logits.device)
        n = min(V, allowed.shape[0])
        mask[:n] = torch.from_numpy(allowed[:n]).to(logits.device)
        if not bool(mask.any()):
            raise RuntimeError(f"grammar: no token is allowed ({self.matcher.get_error() or 'dead end'})")
        return logits.masked_fill(~mask, float("-inf"))
