"""Reading raw input files: every bad-input case becomes a reject, good records of the same file stay."""

from __future__ import annotations

import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llm_ray.data.records import REJECT_REASONS, detect_format, parse_file

GOOD = [f"document number {i} with some words" for i in range(200)]


def write(tmp_path, name: str, data: bytes) -> tuple[str, bytes]:
    """Write the file for real and hand back (path, bytes read back), as the pipeline would."""
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), path.read_bytes()


def reasons(rejects) -> list[tuple[int | None, str]]:
    return [(r["line"], r["reason"]) for r in rejects]


MIXED_JSONL = b"\n".join(
    [
        b'{"text": "first good document", "id": 1}',  # 1
        b"",  # 2: blank, skipped silently
        b'{"text": "broken json", ',  # 3
        b'{"text": "bad byte \xff\xfe here"}',  # 4
        b'{"body": "no text field"}',  # 5
        b'{"text": 42}',  # 6
        b'{"text": null}',  # 7
        b'{"text": "   \\n  "}',  # 8
        b'["a", "list"]',  # 9
        b'{"text": "lone surrogate \\ud800"}',  # 10
        b'{"text": "second good document"}\r',  # 11: CRLF line ending
        b"   ",  # 12: whitespace only, skipped
        b'{"text": "third good document"}',  # 13
    ]
) + b"\n"
MIXED_EXPECTED = [
    (3, "malformed_json"),
    (4, "invalid_utf8"),
    (5, "missing_field"),
    (6, "not_a_string"),
    (7, "missing_field"),
    (8, "empty_text"),
    (9, "malformed_json"),
    (10, "invalid_utf8"),
]


def check_mixed(path, records, rejects):
    assert [r["text"] for r in records] == ["first good document", "second good document", "third good document"]
    assert [r["line"] for r in records] == [1, 11, 13]
    assert [r["doc_id"] for r in records] == [f"{path}#1", f"{path}#11", f"{path}#13"]
    assert all(r["source"] == path for r in records + rejects)
    assert reasons(rejects) == MIXED_EXPECTED
    assert "broken json" in rejects[0]["raw"]
    assert "\ufffd" in rejects[1]["raw"]  # the raw line is kept, undecodable bytes replaced
    assert all(r["detail"] for r in rejects)


# -- format detection -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.jsonl", "jsonl"),
        ("a.JSON", "jsonl"),
        ("s3b/p/a.jsonl.gz", "jsonl"),
        ("a.json.gz", "jsonl"),
        ("a.parquet", "parquet"),
        ("a.txt", "text"),
        ("a.txt.gz", "text"),
    ],
)
def test_detect_format_by_extension(name, fmt):
    assert detect_format(name, "auto") == fmt


def test_detect_format_explicit_and_unknown():
    assert detect_format("data.bin", "jsonl") == "jsonl"
    with pytest.raises(ValueError, match=r"data\.csv.*prepare\.format"):
        detect_format("data.csv", "auto")
    with pytest.raises(ValueError, match="prepare.format"):
        detect_format("a.jsonl", "csv")


# -- JSONL --------------------------------------------------------------------------------------


def test_jsonl_each_bad_line_rejected_good_lines_kept(tmp_path):
    path, data = write(tmp_path, "mixed.jsonl", MIXED_JSONL)
    records, rejects = parse_file(path, data, "auto", "text")
    check_mixed(path, records, rejects)


def test_jsonl_gzip_same_result_as_plain(tmp_path):
    path, data = write(tmp_path, "mixed.jsonl.gz", gzip.compress(MIXED_JSONL))
    records, rejects = parse_file(path, data, "auto", "text")
    check_mixed(path, records, rejects)


def test_gzip_detected_by_magic_bytes_and_already_decompressed_gz(tmp_path):
    # A .jsonl whose bytes are gzip, and a .jsonl.gz that a reader already decompressed.
    path, data = write(tmp_path, "secret-gzip.jsonl", gzip.compress(MIXED_JSONL))
    check_mixed(path, *parse_file(path, data, "auto", "text"))
    path, data = write(tmp_path, "inflated.jsonl.gz", MIXED_JSONL)
    check_mixed(path, *parse_file(path, data, "auto", "text"))


def test_concatenated_gzip_members(tmp_path):
    data = gzip.compress(b'{"text": "one"}\n') + gzip.compress(b'{"text": "two"}\n')
    path, data = write(tmp_path, "cat.jsonl.gz", data)
    records, rejects = parse_file(path, data, "auto", "text")
    assert [r["text"] for r in records] == ["one", "two"] and rejects == []


def test_utf8_bom_is_not_an_error(tmp_path):
    path, data = write(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"text": "after a BOM"}\n')
    record = {"doc_id": f"{path}#1", "source": path, "line": 1, "text": "after a BOM"}
    assert parse_file(path, data, "auto", "text") == ([record], [])
    path, data = write(tmp_path, "bom.txt", b"\xef\xbb\xbfplain doc")
    assert [r["text"] for r in parse_file(path, data, "auto", "text")[0]] == ["plain doc"]


def test_custom_text_field(tmp_path):
    path, data = write(tmp_path, "c.jsonl", b'{"content": "hello"}\n{"text": "wrong field"}\n')
    records, rejects = parse_file(path, data, "jsonl", "content")
    assert [r["text"] for r in records] == ["hello"]
    assert reasons(rejects) == [(2, "missing_field")]


def test_truncated_gzip_keeps_records_before_the_cut(tmp_path):
    lines = b"".join(json.dumps({"text": t}).encode() + b"\n" for t in GOOD)
    full = gzip.compress(lines)
    path, data = write(tmp_path, "cut.jsonl.gz", full[: len(full) * 2 // 3])
    records, rejects = parse_file(path, data, "auto", "text")
    assert 0 < len(records) < len(GOOD)
    assert [r["text"] for r in records] == GOOD[: len(records)]  # a prefix, in order
    assert reasons(rejects) == [(len(records) + 1, "truncated_file")]  # no malformed_json for the cut line
    assert json.dumps({"text": GOOD[len(records)]}).startswith(rejects[0]["raw"])  # the cut-off line, kept raw


def test_truncated_gzip_text_quarantines_the_last_document(tmp_path):
    text = "\n\n".join(f"{t}\nsecond line of {i}" for i, t in enumerate(GOOD)).encode()
    full = gzip.compress(text)
    path, data = write(tmp_path, "cut.txt.gz", full[: len(full) // 2])
    records, rejects = parse_file(path, data, "auto", "text")
    n = len(records)
    assert 0 < n < len(GOOD)
    assert [r["text"] for r in records] == [f"{t}\nsecond line of {i}" for i, t in enumerate(GOOD[:n])]
    assert reasons(rejects) == [(n, "truncated_file")]  # document indexes are 0-based


def test_corrupt_gzip_is_unreadable(tmp_path):
    # Not gzip at all (binary garbage named .gz), and gzip magic followed by garbage.
    path, data = write(tmp_path, "junk.jsonl.gz", bytes(range(256)) * 4)
    assert reasons(parse_file(path, data, "auto", "text")[1]) == [(None, "unreadable_file")]
    path, data = write(tmp_path, "bad.jsonl.gz", b"\x1f\x8b\x08\x00" + b"\xff" * 64)
    records, rejects = parse_file(path, data, "auto", "text")
    assert records == [] and reasons(rejects) == [(None, "unreadable_file")]


@pytest.mark.parametrize(
    "name, data", [("e.jsonl", b""), ("e.jsonl.gz", gzip.compress(b"")), ("b.jsonl", b"\n\n  \n"), ("e.txt", b"")]
)
def test_empty_files(tmp_path, name, data):
    path, data = write(tmp_path, name, data)
    records, rejects = parse_file(path, data, "auto", "text")
    assert records == [] and reasons(rejects) == [(None, "empty_file")]


def test_raw_is_truncated(tmp_path):
    path, data = write(tmp_path, "long.jsonl", b'{"text": "' + b"x" * 5000 + b"\n")
    (rej,) = parse_file(path, data, "auto", "text")[1]
    assert rej["reason"] == "malformed_json" and len(rej["raw"]) == 1000


def test_doc_ids_unique_and_deterministic(tmp_path):
    lines = b"".join(json.dumps({"text": "same text"}).encode() + b"\n" for _ in range(5))
    path, data = write(tmp_path, "dup.jsonl", lines)
    first = parse_file(path, data, "auto", "text")[0]
    assert len({r["doc_id"] for r in first}) == 5
    assert first == parse_file(path, data, "auto", "text")[0]


# -- plain text ---------------------------------------------------------------------------------


def test_text_invalid_utf8_rejects_only_that_document(tmp_path):
    data = b"first doc\nstill first\n\n\nsecond \xff\xfe doc\n\nthird doc \xc3\xa9\r\n\r\nfourth"
    path, data = write(tmp_path, "t.txt", data)
    records, rejects = parse_file(path, data, "auto", "text")
    assert [(r["line"], r["text"]) for r in records] == [(0, "first doc\nstill first"), (2, "third doc é"), (3, "fourth")]
    assert reasons(rejects) == [(1, "invalid_utf8")]
    assert rejects[0]["raw"].startswith("second ") and "\ufffd" in rejects[0]["raw"]


# -- Parquet ------------------------------------------------------------------------------------


def parquet_bytes(table: pa.Table, **kwargs) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf, **kwargs)
    return buf.getvalue()


def test_parquet_null_and_empty_rows_rejected_others_kept(tmp_path):
    table = pa.table({"text": ["good one", None, "", "good two"], "id": [1, 2, 3, 4]})
    path, data = write(tmp_path, "p.parquet", parquet_bytes(table, row_group_size=2))
    records, rejects = parse_file(path, data, "auto", "text")
    assert [(r["line"], r["text"]) for r in records] == [(0, "good one"), (3, "good two")]
    assert reasons(rejects) == [(1, "missing_field"), (2, "empty_text")]


def test_parquet_non_string_and_binary_columns(tmp_path):
    path, data = write(tmp_path, "n.parquet", parquet_bytes(pa.table({"text": [1, 2]})))
    assert reasons(parse_file(path, data, "auto", "text")[1]) == [(0, "not_a_string"), (1, "not_a_string")]
    table = pa.table({"text": pa.array([b"bytes text", b"\xff bad"], pa.binary())})
    path, data = write(tmp_path, "b.parquet", parquet_bytes(table))
    records, rejects = parse_file(path, data, "auto", "text")
    assert [r["text"] for r in records] == ["bytes text"] and reasons(rejects) == [(1, "invalid_utf8")]


def test_parquet_missing_column(tmp_path):
    path, data = write(tmp_path, "m.parquet", parquet_bytes(pa.table({"body": ["x"]})))
    records, rejects = parse_file(path, data, "auto", "text")
    assert records == [] and reasons(rejects) == [(None, "missing_field")]
    assert "body" in rejects[0]["detail"]


def test_parquet_corrupt_or_empty(tmp_path):
    good = parquet_bytes(pa.table({"text": GOOD}))
    for name, data in [("cut.parquet", good[: len(good) // 2]), ("junk.parquet", b"PAR1 not really parquet")]:
        path, data = write(tmp_path, name, data)
        records, rejects = parse_file(path, data, "auto", "text")
        assert records == [] and reasons(rejects) == [(None, "unreadable_file")]
    path, data = write(tmp_path, "zero.parquet", parquet_bytes(pa.table({"text": pa.array([], pa.string())})))
    assert reasons(parse_file(path, data, "auto", "text")[1]) == [(None, "empty_file")]


def test_every_reason_is_exercised(tmp_path):
    """Guards REJECT_REASONS against drift: each listed reason is produced by some input."""
    seen = {r for _, r in MIXED_EXPECTED}
    full = gzip.compress(b'{"text": "a"}\n' * 1000)
    cases = [
        ("e.jsonl", b""),
        ("t.jsonl.gz", full[: len(full) // 2]),
        ("u.parquet", b"not parquet"),
    ]
    for name, data in cases:
        path, data = write(tmp_path, name, data)
        seen |= {r["reason"] for r in parse_file(path, data, "auto", "text")[1]}
    assert seen == set(REJECT_REASONS)
