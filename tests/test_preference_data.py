"""Preference data (``llm_ray.data.preference``): record shapes, loss masks, truncation, rejects,
and the same examples from JSONL, Parquet and S3. Fast, no Ray."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from llm_ray.bundle import load_bundle
from llm_ray.data.packing import IGNORE_INDEX
from llm_ray.data.preference import (
    PAIR_ARRAYS,
    build_preference_examples,
    encode_preference,
    encode_response,
    load_preference_data,
    preference_encoder,
    preference_pair,
    read_preference_records,
)
from llm_ray.data.sft import BadRecord, ChatTemplate
from llm_ray.generation.api import pad_id_for
from tests.conftest import REPO

PAIRS = str(REPO / "jobs/data/preference/pairs.jsonl")
BAD_PAIRS = str(REPO / "jobs/data/preference/bad_pairs.jsonl")
SEQ_LEN, MAX_PROMPT = 128, 64


@pytest.fixture(scope="module")
def bundle(tiny_model_dir):
    return load_bundle(tiny_model_dir)


@pytest.fixture(scope="module")
def encode(bundle):
    return preference_encoder(ChatTemplate.for_bundle(bundle), bundle.tokenizer, SEQ_LEN, pad_id_for(bundle), MAX_PROMPT)


def labelled_runs(labels: np.ndarray) -> list[list[int]]:
    runs, current = [], []
    for y in labels.tolist():
        if y != IGNORE_INDEX:
            current.append(y)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def assert_same_examples(a, b):
    assert len(a) == len(b) > 0
    for name in PAIR_ARRAYS:
        np.testing.assert_array_equal(a.arrays()[name], b.arrays()[name], err_msg=name)


# ---- record shapes ------------------------------------------------------------------------------


def test_both_shapes_parse_to_the_same_pair():
    q, good, bad = "What is 2 plus 2?", "Sure! 2 plus 2 is 4.", "Go away."
    user, sys_ = {"role": "user", "content": q}, {"role": "system", "content": "Be kind."}
    strings = {"prompt": q, "chosen": good, "rejected": bad, "margin": 2}
    conversation = {"chosen": [user, {"role": "assistant", "content": good}],
                    "rejected": [user, {"role": "assistant", "content": bad}], "margin": 2.0}
    explicit = {"prompt": [user], "chosen": [{"role": "assistant", "content": good}],
                "rejected": [{"role": "assistant", "content": bad}], "margin": 2}
    expected = ([user], good, bad, 2.0)
    assert preference_pair(strings) == preference_pair(conversation) == preference_pair(explicit) == expected
    assert preference_pair(strings, "Be kind.") == ([sys_, user], good, bad, 2.0)
    with_system = {"chosen": [sys_, user, {"role": "assistant", "content": good}],
                   "rejected": [sys_, user, {"role": "assistant", "content": bad}]}
    assert preference_pair(with_system, "Other.") == ([sys_, user], good, bad, 0.0)  # its own system turn wins
    assert preference_pair({**strings, "margin": None})[3] == 0.0  # null = absent (Parquet)


@pytest.mark.parametrize("record, reason", [
    ({"prompt": "Q?", "chosen": "A."}, "missing_field"),
    ({"chosen": "A.", "rejected": "B."}, "missing_field"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": None}, "missing_field"),
    ({"prompt": 3, "chosen": "A.", "rejected": "B."}, "bad_content"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": {"text": "B."}}, "bad_content"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": [{"role": "assistant", "content": "B."}]}, "bad_content"),
    ({"prompt": [{"role": "user", "content": "Q?"}], "chosen": [{"role": "assistant", "content": 1}],
      "rejected": [{"role": "assistant", "content": "B."}]}, "bad_content"),
    ({"prompt": "Q?", "chosen": " A. ", "rejected": "A."}, "identical_responses"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": ""}, "empty_response"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "R?"}, {"role": "assistant", "content": "B."}]}, "bad_conversation"),
    ({"chosen": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "user", "content": "Q?"}]}, "bad_conversation"),
    ({"chosen": [{"role": "assistant", "content": "A."}], "rejected": [{"role": "assistant", "content": "B."}]}, "bad_conversation"),
    ({"chosen": [{"role": "wizard", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "rejected": [{"role": "wizard", "content": "Q?"}, {"role": "assistant", "content": "B."}]}, "bad_conversation"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": "high"}, "bad_margin"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": math.nan}, "bad_margin"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": math.inf}, "bad_margin"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "margin": True}, "bad_margin"),
])
def test_bad_records_name_their_reason(record, reason):
    with pytest.raises(BadRecord) as err:
        preference_pair(record)
    assert err.value.reason == reason


# ---- what carries labels ------------------------------------------------------------------------


def test_only_response_tokens_carry_labels(chat_tokenizer):
    template, pad = ChatTemplate(), chat_tokenizer.token_to_id("<|pad|>")
    im_end = chat_tokenizer.token_to_id("<|im_end|>")
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Opposite of wet?"},
              {"role": "assistant", "content": "Dry."}, {"role": "user", "content": "And of loud?"}]
    out = encode_preference(prompt, "Quiet.", "Ugh, whatever.", template, chat_tokenizer, 96, pad, 96)
    assert not out["prompt_truncated"] and not out["response_truncated"]
    for name, response in (("chosen", "Quiet."), ("rejected", "Ugh, whatever.")):
        inputs, labels, length = out[f"{name}_input_ids"], out[f"{name}_labels"], out[f"{name}_length"]
        assert inputs.shape == labels.shape == (96,) and inputs.dtype == labels.dtype == np.int64
        full = chat_tokenizer.encode(template.render(prompt + [{"role": "assistant", "content": response}]),
                                     add_special_tokens=False).ids
        assert length == len(full) - 1 and inputs[:length].tolist() == full[:-1]
        assert inputs[length - 1] == im_end  # the last real input token: where a reward head reads
        one = encode_response(prompt, response, template, chat_tokenizer, 96, pad, 96)  # one side alone
        assert one[0].tolist() == inputs.tolist() and one[1].tolist() == labels.tolist() and one[2:] == (length, False, False)
        assert (inputs[length:] == pad).all() and (labels[length:] == IGNORE_INDEX).all()
        # exactly the final answer and its end-of-turn marker; the earlier assistant turn is prompt
        runs = labelled_runs(labels)
        assert [chat_tokenizer.decode(r, skip_special_tokens=False) for r in runs] == [f"{response}<|im_end|>\n"]
        first = int(np.flatnonzero(labels != IGNORE_INDEX)[0])
        assert chat_tokenizer.decode(inputs[: first + 1].tolist(), skip_special_tokens=False).endswith("<|im_start|>assistant\n")


def test_truncation_keeps_prompt_end_and_response_start(chat_tokenizer):
    template, pad, seq_len, max_prompt = ChatTemplate(), 0, 48, 16
    question = " ".join(f"w{i}" for i in range(8)) + " What is the capital of France?"
    answer = "The capital of France is Paris. " * 10
    prompt = [{"role": "user", "content": question}]
    out = encode_preference(prompt, answer, "No.", template, chat_tokenizer, seq_len, pad, max_prompt)
    assert out["prompt_truncated"] and out["response_truncated"]

    text = template.render(prompt, add_generation_prompt=True)
    prompt_ids = chat_tokenizer.encode(text, add_special_tokens=False).ids
    response_ids = chat_tokenizer.encode(template.render(prompt + [{"role": "assistant", "content": answer}]),
                                         add_special_tokens=False).ids[len(prompt_ids):]
    assert seq_len >= len(prompt_ids) > max_prompt
    inputs, labels = out["chosen_input_ids"], out["chosen_labels"]
    assert inputs[:max_prompt].tolist() == prompt_ids[-max_prompt:]  # the prompt's end, with the question
    kept = seq_len + 1 - max_prompt
    assert labelled_runs(labels) == [response_ids[:kept]]  # the response's start
    assert out["chosen_length"] == seq_len and inputs[max_prompt:].tolist() == response_ids[: kept - 1]
    # the short rejected answer is whole, after the same truncated prompt
    assert out["rejected_input_ids"][:max_prompt].tolist() == prompt_ids[-max_prompt:]
    assert chat_tokenizer.decode(labelled_runs(out["rejected_labels"])[0], skip_special_tokens=False) == "No.<|im_end|>\n"

    records = [("mem", 1, {"prompt": question, "chosen": answer, "rejected": "No."}),
               ("mem", 2, {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}),
               ("mem", 3, {"prompt": question * 3, "chosen": "A.", "rejected": "B."})]
    ex = build_preference_examples(records, preference_encoder(template, chat_tokenizer, seq_len, pad, max_prompt))
    assert len(ex) == 2 and ex.prompt_truncated == 1 and ex.response_truncated == 1
    assert [(r["line"], r["reason"]) for r in ex.rejects] == [(3, "prompt_too_long")]  # > seq_len before truncation
    assert ex.subset([1]).prompt_truncated == 0 and ex.subset([0]).response_truncated == 1


# ---- files: the shipped sets, rejects, splits ----------------------------------------------------


def test_bad_pairs_are_rejected_and_good_ones_kept(bundle):
    train, held, rejects = load_preference_data(BAD_PAIRS, "", 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    reasons = sorted(r["reason"] for r in rejects)
    assert reasons == sorted(["missing_field", "identical_responses", "bad_content", "prompt_too_long", "invalid_json",
                              "not_an_object", "empty_response", "bad_margin", "bad_conversation"])
    assert len(train) + len(held) == 5 and len(held) == 1
    lines = open(BAD_PAIRS).read().splitlines()
    for r in rejects:
        assert set(r) == {"source", "line", "reason", "detail", "record"} and r["source"].endswith("bad_pairs.jsonl")
        assert lines[r["line"] - 1].startswith(r["record"][:20])  # the line numbers point at the bad lines


def test_shipped_pairs_load_cleanly_and_are_balanced(bundle):
    records, bad = read_preference_records(PAIRS)
    assert not bad and 100 <= len(records) <= 140
    shapes = {("str" if isinstance(r["chosen"], str) else "prompt+conv" if "prompt" in r else "conv") for _, _, r in records}
    assert shapes == {"str", "conv", "prompt+conv"}
    train, held, rejects = load_preference_data(PAIRS, "", 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    assert not rejects and len(held) == round(0.2 * len(records)) and len(train) + len(held) == len(records)
    assert train.prompt_truncated == train.response_truncated == 0
    both = [train, held]
    assert 3 <= sum(int((ex.margin > 0).sum()) for ex in both) < len(records) / 2  # a few carry a margin
    chosen = np.concatenate([ex.chosen_length for ex in both])
    rejected = np.concatenate([ex.rejected_length for ex in both])
    assert abs(chosen.mean() - rejected.mean()) < 0.1 * chosen.mean()  # length is not the signal
    assert 0.35 < (chosen > rejected).mean() < 0.65
    # seeded: the same split again, another with another seed; eval_path: no split
    again, _, _ = load_preference_data(PAIRS, "", 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    other, _, _ = load_preference_data(PAIRS, "", 0.2, 1, bundle, SEQ_LEN, MAX_PROMPT)
    assert_same_examples(train, again)
    assert not np.array_equal(train.chosen_input_ids, other.chosen_input_ids)
    full, eval_set, rejects = load_preference_data(PAIRS, BAD_PAIRS, 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    assert len(full) == len(records) and len(eval_set) == 5 and len(rejects) == 9
    assert set(full.arrays()) == set(PAIR_ARRAYS) and full.margin.dtype == np.float32
    assert full.chosen_input_ids.shape == (len(records), SEQ_LEN) and full.chosen_length.shape == (len(records),)


def test_no_usable_pair_names_the_key(bundle, tmp_path):
    only_bad = tmp_path / "only_bad.jsonl"
    only_bad.write_text(json.dumps({"prompt": "Q?", "chosen": "A."}) + "\n{broken\n")
    from llm_ray.config import RecipeError

    with pytest.raises(RecipeError) as err:
        load_preference_data(str(only_bad), "", 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    assert err.value.key == "finetune.train_path"
    with pytest.raises(RecipeError) as err:
        load_preference_data(PAIRS, str(only_bad), 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    assert err.value.key == "finetune.eval_path"
    with pytest.raises(RecipeError) as err:  # a path that does not exist: one line, not a traceback
        load_preference_data(str(tmp_path / "missing.jsonl"), "", 0.2, 0, bundle, SEQ_LEN, MAX_PROMPT)
    assert err.value.key == "finetune.train_path"


def test_unexpected_encoding_errors_are_rejects_not_fatal(chat_tokenizer):
    records = [("mem", 1, {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go."}),
               ("mem", 2, {"prompt": "Hi?", "chosen": "Hello \ud800.", "rejected": "Go."}),  # lone surrogate
               ("mem", 3, {"prompt": "Café?", "chosen": "Oui.", "rejected": "Non."})]
    ex = build_preference_examples(records, preference_encoder(ChatTemplate(), chat_tokenizer, 32, 0, 16))
    assert len(ex) == 2
    assert [(r["line"], r["reason"]) for r in ex.rejects] == [(2, "encode_error")]
    assert "TypeError" in ex.rejects[0]["detail"]  # the tokenizer refused the text
    # a template that breaks on some content (here: non-ASCII) costs that record only
    ascii_only = ChatTemplate("{% for m in messages %}{{ m['role'] }}: {{ m['content'].encode('ascii').decode() }}\n{% endfor %}"
                              "{% if add_generation_prompt %}assistant: {% endif %}")
    ex = build_preference_examples(records, preference_encoder(ascii_only, chat_tokenizer, 32, 0, 16))
    assert len(ex) == 1 and [r["reason"] for r in ex.rejects] == ["encode_error", "encode_error"]
    assert "UnicodeEncodeError" in ex.rejects[1]["detail"]


# ---- the same examples from Parquet and S3 -------------------------------------------------------


def write_parquet_folder(folder, records: list[dict]) -> list[dict]:
    """Conversational and string records as two Parquet files (a column has one type); -> the
    records in the order the folder reads them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [r for r in records if isinstance(r["chosen"], list)]
    strings = [r for r in records if isinstance(r["chosen"], str)]
    folder.mkdir(exist_ok=True)
    for name, rows in (("a_conversations.parquet", conv), ("b_strings.parquet", strings)):
        keys = sorted({k for r in rows for k in r})
        pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows]), str(folder / name))
    (folder / "README.md").write_text("not data\n")  # not a data file: skipped
    return conv + strings


def test_parquet_gives_the_same_examples_as_jsonl(encode, tmp_path):
    records = [json.loads(line) for line in open(PAIRS)]
    ordered = write_parquet_folder(tmp_path / "pq", records)
    jsonl = tmp_path / "same.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ordered))

    from_parquet, bad = read_preference_records(str(tmp_path / "pq"))
    assert not bad and [n for _, n, _ in from_parquet[:2]] == [0, 1]  # Parquet rows count from 0
    from_jsonl, _ = read_preference_records(str(jsonl))
    a, b = build_preference_examples(from_parquet, encode), build_preference_examples(from_jsonl, encode)
    assert not a.rejects and not b.rejects and len(a) == len(records)
    assert_same_examples(a, b)
    (tmp_path / "pq" / "c_corrupt.parquet").write_bytes(b"PAR1 not really")
    _, bad = read_preference_records(str(tmp_path / "pq"))
    assert [r["reason"] for r in bad] == ["unreadable_file"]


def test_s3_gives_the_same_examples_as_local(encode, s3_endpoint, s3_bucket, tmp_path):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    ordered = write_parquet_folder(tmp_path / "pq", [json.loads(line) for line in open(PAIRS)][:30])
    for name in ("a_conversations.parquet", "b_strings.parquet"):
        s3.put_object(Bucket=s3_bucket, Key=f"prefs/{name}", Body=(tmp_path / "pq" / name).read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="prefs/c_bad_pairs.jsonl", Body=open(BAD_PAIRS, "rb").read())
    (tmp_path / "pq" / "c_bad_pairs.jsonl").write_bytes(open(BAD_PAIRS, "rb").read())

    remote, remote_bad = read_preference_records(f"s3://{s3_bucket}/prefs/", s3_endpoint)
    local, local_bad = read_preference_records(str(tmp_path / "pq"))
    assert [(n, r) for _, n, r in remote] == [(n, r) for _, n, r in local] and len(remote) == len(ordered) + 12
    assert remote[0][0] == f"s3://{s3_bucket}/prefs/a_conversations.parquet"
    assert [(r["line"], r["reason"]) for r in remote_bad] == [(r["line"], r["reason"]) for r in local_bad] != []
    assert all(r["source"] == f"s3://{s3_bucket}/prefs/c_bad_pairs.jsonl" for r in remote_bad)
    a, b = build_preference_examples(remote, encode), build_preference_examples(local, encode)
    assert_same_examples(a, b)
    assert [r["reason"] for r in a.rejects] == [r["reason"] for r in b.rejects] and len(a.rejects) == 7
    one, _ = read_preference_records(f"s3://{s3_bucket}/prefs/c_bad_pairs.jsonl", s3_endpoint)  # a single object
    assert len(one) == 12
