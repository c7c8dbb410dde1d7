"""Streamed text (no Ray): incremental detokenization (``TextStream``) and the exact UTF-8
bytes of each token (``TokenBytes``), for the tokenizers we train and SmolLM2's."""

from __future__ import annotations

import pytest

STREAM_TEXTS = [
    "The data model trains on a batch of tokens, then the cache is resumed from a checkpoint.",
    "caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001f642 \u2014 r\u00e9sum\u00e9, \u00fc\u00df, \u0645\u0631\u062d\u0628\u0627",
    "def step(x):\n    return x * 2  # doubled\n\n\tindented\n",
]


class _CountingTokenizer:
    """Counts the ids TextStream asks to decode (to see the cost per token)."""

    def __init__(self, tok):
        self.tok, self.decoded = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "smollm2"])
def test_text_stream_deltas_equal_the_whole_decode(kind, tokenizer_paths, smollm2_dir):
    """Streamed deltas + the held-back tail equal decode(all ids) for real texts (multi-byte
    characters split across tokens included) and random ids; a token costs a bounded decode,
    not the whole output again; a stop string cuts the stream exactly where the full text does."""
    import random

    from tokenizers import Tokenizer

    from llm_ray.serve.text_stream import TextStream

    path = f"{smollm2_dir}/tokenizer.json" if kind == "smollm2" else tokenizer_paths[kind]
    tok = Tokenizer.from_file(path)
    rng = random.Random(0)
    cases = [tok.encode(t).ids for t in STREAM_TEXTS]
    cases += [[rng.randrange(tok.get_vocab_size()) for _ in range(300)] for _ in range(3)]
    for ids in cases:
        whole = tok.decode(ids, skip_special_tokens=True)
        # tokenizers' DecodeStream (a Tokenizer) and the Python scheme (any other tokenizer object)
        library = TextStream(tok, stop=[])
        assert library._library is not None
        deltas = [library.push(i) for i in ids]
        assert library._library is not None, "DecodeStream gave up on this text"
        assert "".join(deltas) + library.finish() == whole
        counting = _CountingTokenizer(tok)
        stream = TextStream(counting, stop=[])
        python_deltas = [stream.push(i) for i in ids]
        assert counting.decoded < 40 * len(ids)  # the old whole-output decode: ~len(ids)**2 / 2
        assert "".join(python_deltas) + stream.finish() == whole
        assert python_deltas == deltas  # the same text at the same tokens

    ids = tok.encode(STREAM_TEXTS[0]).ids
    full = tok.decode(ids, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    stream = TextStream(tok, stop=[stop])
    streamed = ""
    for i in ids:
        streamed += stream.push(i)
        assert stop not in streamed
        if stream.stopped:
            break
    assert stream.stopped and streamed + stream.finish() == stream.final_text() == full[: full.index(stop)]


@pytest.mark.parametrize("kind", ["bpe", "smollm2"])
def test_token_bytes_add_up_to_the_text(kind, tokenizer_paths, smollm2_dir):
    """logprobs' ``bytes``: a byte-level token holding part of a character gives its own bytes
    (decode of the token alone would give U+FFFD), so the tokens' bytes join to the text."""
    from tokenizers import Tokenizer

    from llm_ray.serve.text_stream import TokenBytes

    tok = Tokenizer.from_file(f"{smollm2_dir}/tokenizer.json" if kind == "smollm2" else tokenizer_paths[kind])
    token_bytes = TokenBytes(tok)
    assert token_bytes.byte_level
    for text in STREAM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert any("\ufffd" in tok.decode([i]) for i in ids) or text.isascii()
        assert bytes(b for i in ids for b in token_bytes(i)).decode("utf-8") == tok.decode(ids)
