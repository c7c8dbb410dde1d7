"""Raw input files -> text records, with every piece of bad input kept as a reject.

``parse_file`` never raises on bad content: a malformed line, an undecodable byte, a missing
field, an empty or truncated file each become one reject (reason + source location + raw
content) while the good records of the same file are kept. The caller counts rejects by reason
and writes them under ``rejects/`` (issue 3: bad input is never fatal and never silently lost).

Record: ``{"doc_id", "source", "line", "text"}``; ``doc_id = f"{source}#{line}"`` is unique and
deterministic, so dedup can pick the same survivor on every run.
Reject: ``{"source", "line", "reason", "detail", "raw"}``.

``line`` is the 1-based line number for JSONL (what an editor shows), the 0-based row index for
Parquet (what pyarrow and pandas show) and the 0-based document index for text files (documents
are separated by blank lines, as in ``text_files.read_documents``). File-level rejects have
``line=None``.
"""

from __future__ import annotations

import codecs
import json
import re
import zlib
from typing import Optional

REJECT_REASONS = (
    "malformed_json",
    "invalid_utf8",
    "missing_field",
    "not_a_string",
    "empty_file",
    "truncated_file",
    "unreadable_file",  # e.g. a corrupt gzip or Parquet file
    "empty_text",
)

FORMATS = ("jsonl", "parquet", "text")
_SUFFIXES = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".jsonl.gz": "jsonl",
    ".json.gz": "jsonl",
    ".parquet": "parquet",
    ".txt": "text",
    ".txt.gz": "text",
}
_GZIP_MAGIC = b"\x1f\x8b"
_RAW_LIMIT = 1000  # chars of offending content kept per reject
_CHUNK = 1 << 16  # gzip input fed per step, so a corrupt tail loses at most what follows it
# Same document rule as text_files.read_documents: one or more blank lines end a document.
_BLANK_LINES = re.compile(r"\n\s*\n")
_BLANK_LINES_B = re.compile(rb"\n\s*\n")  # ASCII whitespace only; used to cut a truncated stream

Record = dict
Reject = dict


def detect_format(path: str, fmt: str = "auto") -> str:
    """``fmt`` if given, else the format named by the file extension."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ValueError(f"prepare.format: {fmt!r} is not one of auto, {', '.join(FORMATS)}")
        return fmt
    name = path.lower()
    # Longest suffix first so ".jsonl.gz" wins over ".gz".
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return _SUFFIXES[suffix]
    raise ValueError(
        f"{path}: cannot tell the format from the extension (known: {', '.join(sorted(_SUFFIXES))}); "
        "set prepare.format to jsonl, parquet or text"
    )


def parse_file(path: str, data: bytes, fmt: str, text_field: str) -> tuple[list[Record], list[Reject]]:
    """Records and rejects of one file's bytes. ``fmt`` may be "auto" (by extension)."""
    fmt = detect_format(path, fmt)
    if not data:
        return [], [_reject(path, None, "empty_file", "file has 0 bytes", b"")]
    if fmt == "parquet":
        return _parse_parquet(path, data, text_field)

    rejects: list[Reject] = []
    data, tail = _maybe_gunzip(path, data, rejects)
    if data is None:  # unreadable: the reject is already recorded
        return [], rejects
    if not data.strip() and tail is None:
        # A file of blank lines holds no document; say so instead of yielding nothing silently.
        return [], rejects + [_reject(path, None, "empty_file", "no content after decompression", data)]

    if tail is not None:
        # The stream ended mid-file: the last line (JSONL) or document (text) may be cut short,
        # so it is quarantined whole rather than parsed as if it were complete.
        data, fragment = _split_complete(data, fmt)
    if fmt == "jsonl":
        records, bad, last = _parse_jsonl(path, data, text_field)
    else:
        records, bad, last = _parse_text(path, data)
    rejects.extend(bad)
    if tail is not None:
        reason, detail = tail
        rejects.append(_reject(path, last + 1, reason, detail, fragment))
    return records, rejects


# -- decompression --------------------------------------------------------------------------


def _maybe_gunzip(path: str, data: bytes, rejects: list[Reject]):
    """(content, error) where error is None for a complete stream, else (reason, detail).

    gzip is recognised by its magic bytes, so bytes that a reader already decompressed (Ray's
    file readers decompress ``*.gz`` on the fly) parse as plain text.
    """
    if not data.startswith(_GZIP_MAGIC):
        if path.lower().endswith(".gz") and not _looks_like_text(data):
            rejects.append(_reject(path, None, "unreadable_file", "not gzip data (bad header)", data))
            return None, None
        return data, None

    out = bytearray()
    error: Optional[tuple[str, str]] = None
    d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    pos = 0
    try:
        while pos < len(data):
            chunk = data[pos : pos + _CHUNK]
            pos += len(chunk)
            out += d.decompress(chunk)
            # Concatenated gzip members (e.g. `cat a.gz b.gz`) are one valid gzip file.
            while d.eof and d.unused_data:
                rest = d.unused_data
                d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
                out += d.decompress(rest)
        if not d.eof:
            error = ("truncated_file", f"gzip stream ends early after {len(data)} compressed bytes")
    except zlib.error as e:
        if not out:
            rejects.append(_reject(path, None, "unreadable_file", f"gzip: {e}", data))
            return None, None
        error = ("unreadable_file", f"gzip: {e} (content before the error kept)")

    return bytes(out), error


def _split_complete(data: bytes, fmt: str) -> tuple[bytes, bytes]:
    """(complete part, possibly cut-off last line or document) of a stream that ended early."""
    if fmt == "jsonl":
        cut = data.rfind(b"\n") + 1
    else:
        ends = [m.end() for m in _BLANK_LINES_B.finditer(data)]
        cut = ends[-1] if ends else 0
    return data[:cut], data[cut:]


def _looks_like_text(data: bytes) -> bool:
    """Mostly valid UTF-8 without NULs: a stray bad byte still leaves a file readable as text
    (it becomes one invalid_utf8 reject), binary garbage does not."""
    head = data[:4096].decode("utf-8", errors="replace")
    bad = head.count("\ufffd") + head.count("\x00")
    return bad <= 0.05 * len(head)


# -- JSONL ----------------------------------------------------------------------------------


def _parse_jsonl(path: str, data: bytes, text_field: str):
    records, rejects = [], []
    lines = data.split(b"\n")
    if data.endswith(b"\n"):
        lines.pop()  # the final newline ends the last line; it does not start another
    for n, raw in enumerate(lines, start=1):
        if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]
        if not raw.strip():
            continue  # blank lines carry nothing; not an error
        try:
            line = raw.decode("utf-8")  # per line, so one bad byte costs one line, not the file
        except UnicodeDecodeError as e:
            rejects.append(_reject(path, n, "invalid_utf8", str(e), raw))
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            rejects.append(_reject(path, n, "malformed_json", str(e), raw))
            continue
        if not isinstance(obj, dict):
            rejects.append(_reject(path, n, "malformed_json", f"expected a JSON object, got {type(obj).__name__}", raw))
            continue
        rec, rej = _make_record(path, n, obj.get(text_field), text_field in obj, text_field, raw)
        (records if rec else rejects).append(rec or rej)
    return records, rejects, len(lines)


# -- plain text -----------------------------------------------------------------------------


def _parse_text(path: str, data: bytes):
    records, rejects = [], []
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    # surrogateescape turns each undecodable byte into a lone surrogate, so the file still
    # splits into documents and only the documents holding bad bytes are rejected.
    text = data.decode("utf-8", errors="surrogateescape")
    docs = [d.strip() for d in _BLANK_LINES.split(text)]
    n = -1
    for doc in docs:
        if not doc:
            continue
        n += 1
        try:
            doc.encode("utf-8")  # fails only on the escaped (invalid) bytes
        except UnicodeEncodeError as e:
            raw = doc.encode("utf-8", errors="surrogateescape")
            detail = f"invalid UTF-8 byte at offset {e.start} of the document"
            rejects.append(_reject(path, n, "invalid_utf8", detail, raw))
            continue
        records.append(_record(path, n, doc))
    return records, rejects, n


# -- Parquet --------------------------------------------------------------------------------


def _parse_parquet(path: str, data: bytes, text_field: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(pa.BufferReader(data))
        names = pf.schema_arrow.names
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ... for a corrupt footer
        return [], [_reject(path, None, "unreadable_file", f"parquet: {e}", data)]
    if text_field not in names:
        detail = f"column {text_field!r} not in {names}; set prepare.text_field"
        return [], [_reject(path, None, "missing_field", detail, b"")]
    if pf.metadata.num_rows == 0:
        return [], [_reject(path, None, "empty_file", "parquet file has 0 rows", b"")]

    records, rejects = [], []
    row = 0
    # Row group by row group: a corrupt group is rejected while the others are kept.
    for g in range(pf.num_row_groups):
        n_rows = pf.metadata.row_group(g).num_rows
        try:
            values = pf.read_row_group(g, columns=[text_field]).column(0).to_pylist()
        except Exception as e:
            detail = f"parquet row group {g} ({n_rows} rows from row {row}): {e}"
            rejects.append(_reject(path, row, "unreadable_file", detail, b""))
            row += n_rows
            continue
        for value in values:
            if isinstance(value, bytes):  # a binary column holding text: decode, strictly
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError as e:
                    rejects.append(_reject(path, row, "invalid_utf8", str(e), value))
                    row += 1
                    continue
            rec, rej = _make_record(path, row, value, True, text_field, value)
            (records if rec else rejects).append(rec or rej)
            row += 1
    return records, rejects


# -- shared ---------------------------------------------------------------------------------


def _make_record(path: str, n: int, value, present: bool, text_field: str, raw):
    """(record, None) for a usable text value, else (None, reject)."""
    if value is None:
        # Null counts as missing: Parquet has no other way to say a value is absent.
        detail = f"field {text_field!r} is null" if present else f"no field {text_field!r}"
        return None, _reject(path, n, "missing_field", detail, raw)
    if not isinstance(value, str):
        return None, _reject(path, n, "not_a_string", f"field {text_field!r} is {type(value).__name__}", raw)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        # JSON escapes such as "\ud800" decode to lone surrogates that no UTF-8 writer accepts;
        # stopping them here keeps them from failing a Parquet write later.
        return None, _reject(path, n, "invalid_utf8", f"lone surrogate in field {text_field!r}: {e.reason}", raw)
    if not value.strip():
        return None, _reject(path, n, "empty_text", f"field {text_field!r} is empty or whitespace", raw)
    return _record(path, n, value), None


def _record(path: str, n: int, text: str) -> Record:
    return {"doc_id": f"{path}#{n}", "source": path, "line": n, "text": text}


def _reject(path: str, line: Optional[int], reason: str, detail: str, raw) -> Reject:
    assert reason in REJECT_REASONS, reason
    if isinstance(raw, (bytes, bytearray)):
        raw = bytes(raw[: _RAW_LIMIT * 4]).decode("utf-8", errors="replace")
    elif not isinstance(raw, str):
        raw = repr(raw)
    return {"source": path, "line": line, "reason": reason, "detail": detail[:300], "raw": raw[:_RAW_LIMIT]}
