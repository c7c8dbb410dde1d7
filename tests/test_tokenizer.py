"""Tokenizer training, persistence and identity, plus the text-file reader that feeds it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from llm_ray.config import RecipeError, TokenizerConfig
from llm_ray.data.text_files import list_text_files, read_documents
from llm_ray.data.tokenizer import (
    encode_documents,
    ensure_tokenizer,
    load_tokenizer,
    save_tokenizer,
    special_ids,
    tokenizer_hash,
    train_tokenizer,
)

CORPUS = str(Path(__file__).resolve().parents[1] / "jobs" / "data" / "tiny_corpus.txt")

ODD_TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\nand CRLF\n\n\n",
    "naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית",
    "emoji 🤗🚀 and a family 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "combining e\u0301 vs \u00e9, zero-width\u200bspace, NUL\x00byte, \U0010ffff",
    "def f(x):\n    return x ** 2  # code stays code",
    "",
]


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer([CORPUS], "bpe", vocab_size=1000)


@pytest.fixture(scope="module")
def wordpiece():
    return train_tokenizer([CORPUS], "wordpiece", vocab_size=1000)


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_bpe_round_trips_any_text(bpe, text):
    ids = bpe.encode(text).ids
    assert bpe.decode(ids) == text


def test_bpe_vocab_size_bounds(bpe):
    assert 256 < bpe.get_vocab_size() <= 1000
    # Merges were learned: a frequent word of the corpus is one token, not five bytes.
    assert len(bpe.encode(" return").ids) == 1
    with pytest.raises(ValueError, match="258"):
        train_tokenizer([CORPUS], "bpe", vocab_size=200)


def test_save_load_gives_identical_ids(bpe, tmp_path):
    path = tmp_path / "nested" / "dir" / "tokenizer.json"
    save_tokenizer(bpe, str(path))
    loaded = load_tokenizer(str(path))
    assert encode_documents(loaded, ODD_TEXTS) == encode_documents(bpe, ODD_TEXTS)
    assert os.listdir(path.parent) == ["tokenizer.json"]  # no temp file left behind


def test_load_missing_names_the_path(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_tokenizer(str(missing))


def test_bpe_special_ids(bpe):
    sp = special_ids(bpe)
    assert sp.eos_id == bpe.token_to_id("<|endoftext|>") is not None
    assert sp.pad_id == bpe.token_to_id("<|pad|>") is not None
    assert sp.eos_id != sp.pad_id
    assert sp.mask_id is None and sp.cls_id is None and sp.unk_id is None
    # The special token is one id and decodes back when asked to keep specials.
    ids = bpe.encode("a<|endoftext|>b").ids
    assert sp.eos_id in ids
    assert bpe.decode(ids, skip_special_tokens=False) == "a<|endoftext|>b"


def test_wordpiece_lowercases_and_wraps(wordpiece):
    enc = wordpiece.encode("Hello World, ASSERT Statements")
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]"
    assert all(t == t.lower() for t in enc.tokens[1:-1])
    assert wordpiece.decode(enc.ids) == "hello world, assert statements"
    pair = wordpiece.encode("first part", "second part")
    assert pair.tokens.count("[SEP]") == 2 and pair.type_ids[-1] == 1
    assert encode_documents(wordpiece, ["Hello"])[0] == wordpiece.encode("Hello", add_special_tokens=False).ids
    assert encode_documents(wordpiece, ["Hello"], add_special_tokens=True)[0] == enc.ids[:1] + wordpiece.encode(
        "Hello", add_special_tokens=False
    ).ids + enc.ids[-1:]


def test_wordpiece_special_ids(wordpiece):
    sp = special_ids(wordpiece)
    assert sp.mask_id == wordpiece.token_to_id("[MASK]") is not None
    assert sp.cls_id == wordpiece.token_to_id("[CLS]") is not None
    assert sp.eos_id == sp.sep_id == wordpiece.token_to_id("[SEP]")
    assert sp.pad_id == wordpiece.token_to_id("[PAD]") is not None
    assert sp.unk_id == wordpiece.token_to_id("[UNK]") is not None
    assert len({sp.mask_id, sp.cls_id, sp.sep_id, sp.pad_id, sp.unk_id}) == 5


def test_hash_stable_across_save_load_and_distinguishes(bpe, wordpiece, tmp_path):
    h = tokenizer_hash(bpe)
    assert len(h) == 16 and int(h, 16) >= 0
    path = str(tmp_path / "tok.json")
    save_tokenizer(bpe, path)
    assert tokenizer_hash(load_tokenizer(path)) == h
    smaller = train_tokenizer([CORPUS], "bpe", vocab_size=500)
    assert len({h, tokenizer_hash(smaller), tokenizer_hash(wordpiece)}) == 3


def test_ensure_trains_saves_then_loads_without_retraining(tmp_path):
    path = tmp_path / "tok" / "tokenizer.json"
    cfg = TokenizerConfig(path=str(path), kind="bpe", vocab_size=600)
    first = ensure_tokenizer(cfg, [CORPUS])
    assert path.is_file()
    os.utime(path, (1_000_000_000, 1_000_000_000))  # any rewrite would move the mtime to now
    second = ensure_tokenizer(cfg, [CORPUS])
    assert path.stat().st_mtime == 1_000_000_000
    assert tokenizer_hash(second) == tokenizer_hash(first)


def test_ensure_with_empty_path_trains_in_memory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok = ensure_tokenizer(TokenizerConfig(path="", kind="wordpiece", vocab_size=500), [CORPUS])
    assert tok.get_vocab_size() <= 500 and special_ids(tok).mask_id is not None
    assert os.listdir(tmp_path) == []


def test_ensure_missing_without_training_names_the_key(tmp_path):
    cfg = TokenizerConfig(path=str(tmp_path / "absent.json"), train_if_missing=False)
    with pytest.raises(ValueError, match=r"data\.tokenizer\.path.*absent\.json"):
        ensure_tokenizer(cfg, [CORPUS])


def test_ensure_refuses_a_tokenizer_of_another_kind(wordpiece, tmp_path):
    path = str(tmp_path / "wp.json")
    save_tokenizer(wordpiece, path)
    with pytest.raises(ValueError, match=r"data\.tokenizer\.kind"):
        ensure_tokenizer(TokenizerConfig(path=path, kind="bpe"), [CORPUS])


def test_list_text_files_recurses_sorted_and_names_missing(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.txt").write_text("z")
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "notes.md").write_text("not text")
    single = tmp_path / "b" / "z.txt"
    assert list_text_files([str(tmp_path), str(single)]) == [str(tmp_path / "a.txt"), str(single)]
    missing = str(tmp_path / "missing_dir")
    with pytest.raises(RecipeError, match=r"data\.paths.*missing_dir"):
        list_text_files([str(tmp_path), missing])
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecipeError, match=r"data\.paths"):
        list_text_files([str(tmp_path / "empty")])


def test_read_documents_splits_on_blank_lines(tmp_path):
    f = tmp_path / "docs.txt"
    f.write_bytes(b"first doc\nline two\n\n\n  second  \r\n  \t \r\nthird \xff byte\n\n\n")
    assert read_documents([str(f)]) == ["first doc\nline two", "second", "third \ufffd byte"]


def test_tiny_corpus_ships_with_many_documents():
    docs = read_documents(list_text_files([CORPUS]))
    assert len(docs) > 2000 and all(d == d.strip() and d for d in docs)
