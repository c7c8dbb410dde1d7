"""Preference data for reward models and DPO: (prompt, chosen, rejected) -> token pairs.

Records come from JSONL or Parquet files, local or on S3 (``llm_ray.storage``), in the two
shapes preference data usually has:

- strings: ``{"prompt": str, "chosen": str, "rejected": str, "margin"?: number}``;
- conversational, as TRL accepts it: ``"chosen"`` and ``"rejected"`` are message lists
  ``[{"role", "content"}, ...]`` sharing a prompt prefix and ending in one assistant message
  each; or, with an explicit ``"prompt"`` message list, just the assistant completions.

Each response is rendered after the prompt as the final assistant turn with the model's chat
template and tokenized once as a whole, with offsets, so the prompt/response boundary is exact
(as ``data/sft.py`` does for SFT). A row holds up to ``seq_len + 1`` tokens: ``input_ids`` the
first ``seq_len``, ``labels`` the next token with ``IGNORE_INDEX`` on prompt tokens and padding,
so only the response (its text and the end-of-turn marker the template writes) carries labels;
``length`` counts the real input tokens, so ``input_ids[length - 1]`` is the last one (where a
reward head reads). Too long: the prompt keeps its end (left-truncated to ``max_prompt_tokens``),
the response its start. Malformed records are kept as rejects (same shape as ``data/sft.py``:
``{"source", "line", "reason", "detail", "record"}``) and never stop a run.

Reject reasons: from reading ``invalid_utf8``, ``invalid_json``, ``not_an_object``,
``unreadable_file``; from ``preference_pair`` ``missing_field``, ``bad_content``,
``empty_response``, ``identical_responses``, ``bad_conversation``, ``bad_margin``; from encoding
``prompt_too_long``, ``response_truncated``, the template's ``chat_template_refused`` /
``template_not_prefix_stable``, and ``encode_error`` for anything else one record raises.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from llm_ray.config import RecipeError
from llm_ray.data.packing import IGNORE_INDEX
from llm_ray.data.sft import ROLES, BadRecord, ChatTemplate, read_jsonl, split_records

Record = tuple[str, int, dict]  # (source, line or row number, record)
PAIR_ARRAYS = ("chosen_input_ids", "chosen_labels", "chosen_length",
               "rejected_input_ids", "rejected_labels", "rejected_length", "margin")
_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


# ---- reading ----------------------------------------------------------------------------------


def _format(uri: str) -> Optional[str]:
    return _FORMATS.get(posixpath.splitext(uri.lower())[1])


def _reject(source: str, line, reason: str, detail: str, record) -> dict:
    if not isinstance(record, str):
        record = json.dumps(record, default=repr)  # ASCII: a lone surrogate stays writable
    return {"source": source, "line": line, "reason": reason, "detail": detail[:300], "record": record[:1000]}


def _read_bytes(uri: str, s3_endpoint: Optional[str]) -> bytes:
    from llm_ray.storage import resolve_storage

    store = resolve_storage(uri, s3_endpoint)
    with store.fs.open_input_stream(store.root) as f:
        return f.read()


def _read_jsonl_file(uri: str, s3_endpoint: Optional[str]) -> tuple[list[Record], list[dict]]:
    if not uri.startswith("s3://"):
        good, bad = read_jsonl(uri)
    else:  # read_jsonl reads a local file: give it a local copy, and the S3 name to the rejects
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, "part.jsonl")
            with open(local, "wb") as f:
                f.write(_read_bytes(uri, s3_endpoint))
            good, bad = read_jsonl(local)
        bad = [{**r, "source": uri} for r in bad]
    return [(uri, n, obj) for n, obj in good], bad


def _read_parquet_file(uri: str, s3_endpoint: Optional[str]) -> tuple[list[Record], list[dict]]:
    """Rows as dicts, numbered from 0 (as pyarrow and pandas show them, like ``data/records.py``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = _read_bytes(uri, s3_endpoint)
    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as e:  # ArrowInvalid, OSError, ... for a corrupt file
        return [], [_reject(uri, None, "unreadable_file", f"parquet: {e}", "")]
    return [(uri, i, row) for i, row in enumerate(rows)], []


def read_preference_records(path: str, s3_endpoint: Optional[str] = None) -> tuple[list[Record], list[dict]]:
    """(source, line-or-row, record) for every parseable record of ``path``, and rejects.

    ``path``: a ``.jsonl``/``.json`` or ``.parquet`` file, or a folder (every such file in it,
    sorted), local or ``s3://bucket/key``. JSONL lines count from 1, Parquet rows from 0.
    """
    from llm_ray.storage import list_files

    files = [f["uri"] for f in list_files(path, s3_endpoint)]
    chosen = [u for u in files if _format(u)]
    if not chosen:
        raise ValueError(f"{path}: no .jsonl, .json or .parquet file (found {len(files)} other file(s))")
    records, rejects = [], []
    for uri in chosen:
        read = _read_parquet_file if _format(uri) == "parquet" else _read_jsonl_file
        good, bad = read(uri, s3_endpoint)
        records += good
        rejects += bad
    return records, rejects


# ---- one record -> (prompt messages, chosen, rejected, margin) ---------------------------------


def _messages(value, name: str) -> list[dict]:
    """A message list -> [{"role", "content"}...]; an empty one is left for the shape checks."""
    from llm_ray.generation.chat import validate_messages

    if not isinstance(value, list):
        raise BadRecord("bad_content", f"{name} must be a string or a list of messages")
    if not value:
        return []
    try:
        messages = validate_messages(value)
    except ValueError as e:  # not a dict, or a role or content that is not a string
        raise BadRecord("bad_content", f"{name}: {e}") from None
    for i, m in enumerate(messages):
        if m["role"] not in ROLES:
            raise BadRecord("bad_conversation", f"{name}[{i}] needs a role in {ROLES}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _margin(record: dict) -> float:
    m = record.get("margin")
    if m is None:
        return 0.0
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise BadRecord("bad_margin", f"margin must be a finite number, got {m!r}")
    return float(m)


def _conversation_pair(record: dict) -> tuple[list[dict], str, str]:
    prompt = _messages(record["prompt"], "prompt") if record.get("prompt") is not None else []
    chosen = prompt + _messages(record["chosen"], "chosen")
    rejected = prompt + _messages(record["rejected"], "rejected")
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if not conv or conv[-1]["role"] != "assistant":
            raise BadRecord("bad_conversation", f"{name} must end in an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise BadRecord("bad_conversation", "chosen and rejected must share everything before their last message")
    return _check_prompt(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"]


def _check_prompt(prompt: list[dict]) -> list[dict]:
    if not prompt or prompt[-1]["role"] != "user":
        raise BadRecord("bad_conversation", "the prompt must end in a user message")
    return prompt


def preference_pair(record: dict, system_prompt: Optional[str] = None) -> tuple[list[dict], str, str, float]:
    """A record in either shape -> (prompt messages, chosen text, rejected text, margin).

    A null value counts as missing (Parquet has no other way to leave one out); margin
    defaults to 0.
    """
    for key in ("chosen", "rejected"):
        if record.get(key) is None:
            raise BadRecord("missing_field", f"no field {key!r}")
    if isinstance(record["chosen"], str) and isinstance(record["rejected"], str):
        prompt = record.get("prompt")
        if prompt is None:
            raise BadRecord("missing_field", "no field 'prompt'")
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            prompt = _check_prompt(_messages(prompt, "prompt"))
        chosen, rejected = record["chosen"], record["rejected"]
    elif isinstance(record["chosen"], list) and isinstance(record["rejected"], list):
        prompt, chosen, rejected = _conversation_pair(record)
    else:
        raise BadRecord("bad_content", "chosen and rejected must both be strings or both message lists")
    if not chosen.strip() or not rejected.strip():
        raise BadRecord("empty_response", "chosen and rejected must be non-empty")
    if chosen.strip() == rejected.strip():
        raise BadRecord("identical_responses", "chosen and rejected are the same text")
    margin = _margin(record)
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}] + prompt
    return prompt, chosen, rejected, margin


# ---- one pair -> token rows --------------------------------------------------------------------


def encode_response(prompt_messages: list[dict], response: str, template: ChatTemplate, tokenizer,
                     seq_len: int, pad_id: int, max_prompt_tokens: int) -> tuple[np.ndarray, np.ndarray, int, bool, bool]:
    """One response after its prompt -> input_ids (T,), labels (T,), length, prompt truncated,
    response truncated (one side of ``encode_preference``; also what scores a single response)."""
    text, spans = template.assistant_spans(prompt_messages + [{"role": "assistant", "content": response}])
    start, end = spans[-1]  # the final assistant turn is the response
    enc = tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
    starts = np.array([s for s, _ in enc.offsets], dtype=np.int64)
    ids = np.asarray(enc.ids, dtype=np.int64)
    prompt_ids, response_ids = ids[starts < start], ids[(starts >= start) & (starts < end)]
    if len(prompt_ids) > seq_len:
        raise BadRecord("prompt_too_long", f"prompt has {len(prompt_ids)} tokens, seq_len is {seq_len}")
    prompt_cut = len(prompt_ids) > max_prompt_tokens
    prompt_ids = prompt_ids[len(prompt_ids) - min(len(prompt_ids), max_prompt_tokens):]  # keep the end
    room = seq_len + 1 - len(prompt_ids)
    response_cut = len(response_ids) > room
    response_ids = response_ids[:room]  # keep the start
    full = np.concatenate([prompt_ids, response_ids])
    in_response = np.arange(len(full)) >= len(prompt_ids)
    n = len(full) - 1  # real input tokens; label i predicts token i + 1
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    inputs[:n], labels[:n] = full[:-1], np.where(in_response[1:], full[1:], IGNORE_INDEX)
    if not (labels != IGNORE_INDEX).any():
        raise BadRecord("response_truncated", f"no response token within seq_len {seq_len}")
    return inputs, labels, n, prompt_cut, response_cut


def encode_preference(prompt_messages: list[dict], chosen: str, rejected: str, template: ChatTemplate, tokenizer,
                      seq_len: int, pad_id: int, max_prompt_tokens: int) -> dict:
    """-> {"chosen_input_ids", "chosen_labels", "chosen_length", "rejected_..." (same three),
    "prompt_truncated", "response_truncated"}: rows of length ``seq_len``, flags for the pair."""
    out = {"prompt_truncated": False, "response_truncated": False}
    for name, response in (("chosen", chosen), ("rejected", rejected)):
        inputs, labels, length, prompt_cut, response_cut = encode_response(
            prompt_messages, response, template, tokenizer, seq_len, pad_id, max_prompt_tokens)
        out.update({f"{name}_input_ids": inputs, f"{name}_labels": labels, f"{name}_length": length})
        out["prompt_truncated"] |= prompt_cut
        out["response_truncated"] |= response_cut
    return out


def preference_encoder(template: ChatTemplate, tokenizer, seq_len: int, pad_id: int, max_prompt_tokens: int,
                       system_prompt: Optional[str] = None) -> Callable[[dict], dict]:
    """``record -> encode_preference(...) | {"margin"}``, for ``build_preference_examples``."""

    def encode(record: dict) -> dict:
        prompt, chosen, rejected, margin = preference_pair(record, system_prompt)
        enc = encode_preference(prompt, chosen, rejected, template, tokenizer, seq_len, pad_id, max_prompt_tokens)
        return {**enc, "margin": margin}

    return encode


# ---- many pairs --------------------------------------------------------------------------------


@dataclass
class PreferenceExamples:
    chosen_input_ids: np.ndarray  # (N, T) int64, right-padded
    chosen_labels: np.ndarray  # (N, T) int64, IGNORE_INDEX off the response
    rejected_input_ids: np.ndarray
    rejected_labels: np.ndarray
    chosen_length: np.ndarray  # (N,) int64 real input tokens
    rejected_length: np.ndarray
    margin: np.ndarray  # (N,) float32
    rejects: list[dict] = field(default_factory=list)  # {"source", "line", "reason", "detail", "record"}
    prompt_cut: Optional[np.ndarray] = None  # (N,) bool: the pair's prompt was left-truncated
    response_cut: Optional[np.ndarray] = None  # (N,) bool: a response was right-truncated

    def __post_init__(self):
        n = len(self.chosen_input_ids)
        self.prompt_cut = np.zeros(n, bool) if self.prompt_cut is None else np.asarray(self.prompt_cut, bool)
        self.response_cut = np.zeros(n, bool) if self.response_cut is None else np.asarray(self.response_cut, bool)

    def __len__(self) -> int:
        return len(self.chosen_input_ids)

    @property
    def prompt_truncated(self) -> int:
        return int(self.prompt_cut.sum())

    @property
    def response_truncated(self) -> int:
        return int(self.response_cut.sum())

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects))

    def arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in PAIR_ARRAYS}

    def subset(self, rows) -> "PreferenceExamples":
        """The given rows (indices or a mask), without the rejects."""
        rows = np.asarray(rows)
        if rows.dtype != bool:
            rows = rows.astype(np.int64)
        picked = {name: a[rows] for name, a in self.arrays().items()}
        return PreferenceExamples(**picked, prompt_cut=self.prompt_cut[rows], response_cut=self.response_cut[rows])


def build_preference_examples(records: list[Record], encode_fn: Callable[[dict], dict]) -> PreferenceExamples:
    """Run ``encode_fn`` (e.g. ``preference_encoder(...)``) over (source, line, record) triples.

    Every ``BadRecord``, and any other exception one record's encoding raises (reason
    ``encode_error``), becomes a reject; the run goes on.
    """
    rows: dict[str, list] = {name: [] for name in PAIR_ARRAYS + ("prompt_truncated", "response_truncated")}
    rejects = []
    for source, line, record in records:
        try:
            enc = encode_fn(record)
        except BadRecord as e:
            rejects.append(_reject(source, line, e.reason, str(e), record))
            continue
        except Exception as e:  # a tokenizer or template choking on one record must not stop the run
            rejects.append(_reject(source, line, "encode_error", f"{type(e).__name__}: {e}", record))
            continue
        for name in rows:
            rows[name].append(enc.get(name, 0.0))
    if not rows["chosen_input_ids"]:
        empty2, empty1 = np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
        return PreferenceExamples(empty2, empty2, empty2, empty2, empty1, empty1, np.zeros(0, np.float32), rejects)
    return PreferenceExamples(
        chosen_input_ids=np.stack(rows["chosen_input_ids"]), chosen_labels=np.stack(rows["chosen_labels"]),
        rejected_input_ids=np.stack(rows["rejected_input_ids"]), rejected_labels=np.stack(rows["rejected_labels"]),
        chosen_length=np.asarray(rows["chosen_length"], np.int64), rejected_length=np.asarray(rows["rejected_length"], np.int64),
        margin=np.asarray(rows["margin"], np.float32), rejects=rejects,
        prompt_cut=np.asarray(rows["prompt_truncated"], bool), response_cut=np.asarray(rows["response_truncated"], bool),
    )


def load_preference_data(path: str, eval_path: Optional[str], eval_fraction: float, seed: int, bundle, seq_len: int,
                         max_prompt_tokens: int, system_prompt: Optional[str] = None,
                         s3_endpoint: Optional[str] = None) -> tuple[PreferenceExamples, PreferenceExamples, list[dict]]:
    """(train, held-out, rejects) for a loaded model folder ``bundle``.

    Without ``eval_path`` the usable pairs are split (seeded, ``split_records``) after
    encoding, so a rejected record never takes a held-out slot.
    """
    from llm_ray.generation.api import pad_id_for
    from llm_ray.storage import StorageError

    if seq_len < 1 or max_prompt_tokens < 1:
        raise RecipeError("align.max_prompt_tokens", f"must be >= 1 (and data.seq_len too), got {max_prompt_tokens} / {seq_len}")
    encode = preference_encoder(ChatTemplate.for_bundle(bundle), bundle.tokenizer, seq_len, pad_id_for(bundle),
                                max_prompt_tokens, system_prompt)

    def build(key: str, where: str) -> PreferenceExamples:
        try:
            records, bad = read_preference_records(where, s3_endpoint)
        except (FileNotFoundError, ValueError, StorageError) as e:  # missing, no data file, unreachable
            raise RecipeError(key, str(e)) from None
        ex = build_preference_examples(records, encode)
        rejects.extend(bad + ex.rejects)
        if len(ex) == 0:
            raise RecipeError(key, f"no usable preference pair in {where} "
                             f"(rejected: {dict(Counter(r['reason'] for r in rejects)) or 'none'})")
        return ex

    rejects: list[dict] = []
    train = build("finetune.train_path", path)
    if eval_path:
        return train.subset(np.arange(len(train))), build("finetune.eval_path", eval_path), rejects
    if len(train) < 2:
        raise RecipeError("finetune.train_path", f"{len(train)} usable pair(s) in {path}; a held-out split needs "
                          "at least 2 (or set finetune.eval_path)")
    train_rows, eval_rows = split_records(list(range(len(train))), eval_fraction, seed)
    return train.subset(train_rows), train.subset(eval_rows), rejects
