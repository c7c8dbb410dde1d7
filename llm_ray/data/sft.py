"""Supervised fine-tuning data: JSONL records -> fixed-length token examples with loss masks.

Chat records are rendered with the model folder's chat template (``tokenizer_config.json``,
Hugging Face's Jinja format; ChatML when the folder has none) and tokenized once as a whole.
Only tokens of assistant turns (their text and the end-of-turn marker the template puts after
it) carry labels; system and user turns, template markers and padding get ``IGNORE_INDEX``.
A token belongs to an assistant turn when its first character lies in that turn's span, found
by rendering the conversation up to the turn with and without ``add_generation_prompt``.

Classification records become ``text`` tokens and one label id. Malformed records are counted
by reason and kept for a rejects file; they never stop a run.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from llm_ray.data.packing import IGNORE_INDEX
from llm_ray.generation.chat import CHATML_TEMPLATE, compile_template

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot become an example; ``reason`` is a short snake_case key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class ChatTemplate:
    """Renders messages with a Hugging Face chat template.

    Compiled by ``llm_ray.generation.chat`` as ``transformers`` does (sandboxed jinja2), so SFT
    does not need transformers installed.
    """

    def __init__(self, template: Optional[str] = None, bos_token: str = "", eos_token: str = ""):
        self.source = template or CHATML_TEMPLATE
        self.special_tokens = {"bos_token": bos_token, "eos_token": eos_token}

    @classmethod
    def for_bundle(cls, bundle) -> "ChatTemplate":
        """The template of a loaded model folder (ChatML when it has none), with its BOS/EOS."""
        from llm_ray.generation.chat import bundle_special_tokens

        specials = bundle_special_tokens(bundle)
        return cls(bundle.chat_template, specials.get("bos_token", ""), specials.get("eos_token", ""))

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        import jinja2

        try:
            return compile_template(self.source).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except jinja2.exceptions.TemplateError as e:  # the template's raise_exception refused the chat
            raise BadRecord("chat_template_refused", str(e)) from None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation's text and the character spans of its assistant turns."""
        text = self.render(messages)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[: i + 1])
            if not (upto.startswith(prompt) and text.startswith(upto)):
                raise BadRecord("template_not_prefix_stable", f"turn {i} renders differently alone than in context")
            spans.append((len(prompt), len(upto)))
        return text, spans


def chat_messages(record: dict, system_prompt: Optional[str] = None) -> list[dict]:
    """A record in one of the accepted shapes -> validated [{"role", "content"}...]."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRecord("bad_messages", "messages must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRecord("bad_role", f"message {i} needs role in {ROLES}")
            if not isinstance(m.get("content"), str):
                raise BadRecord("bad_content", f"message {i} needs a string content")
            out.append({"role": m["role"], "content": m["content"]})
    elif "instruction" in record:  # Alpaca
        instruction, extra, output = record.get("instruction"), record.get("input", ""), record.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str) or not isinstance(extra, str):
            raise BadRecord("bad_content", "instruction, input and output must be strings")
        out = [{"role": "user", "content": instruction + (f"\n\n{extra}" if extra else "")},
               {"role": "assistant", "content": output}]
    elif "prompt" in record:
        response = record.get("response", record.get("completion"))
        if not isinstance(record["prompt"], str) or not isinstance(response, str):
            raise BadRecord("bad_content", "prompt and response must be strings")
        out = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": response}]
    else:
        raise BadRecord("unknown_format", "expected messages, instruction/output or prompt/response")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise BadRecord("no_assistant_turn", "nothing to learn: no non-empty assistant message")
    if not any(m["role"] == "user" for m in out):
        raise BadRecord("no_user_turn", "an assistant turn needs a user turn before it")
    if out[0]["role"] == "assistant" or (out[0]["role"] == "system" and len(out) > 1 and out[1]["role"] == "assistant"):
        raise BadRecord("assistant_first", "a conversation starts with a user turn")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return out


def encode_chat(messages: list[dict], template: ChatTemplate, tokenizer, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids (T,), labels (T,) with T = seq_len: next-token labels on assistant text only."""
    text, spans = template.assistant_spans(messages)
    enc = tokenizer.encode(text, add_special_tokens=False)  # the template writes any BOS itself
    ids = np.asarray(enc.ids, dtype=np.int64)
    in_response = np.array([any(a <= start < b for a, b in spans) for start, _ in enc.offsets], dtype=bool)
    ids, in_response = ids[: seq_len + 1], in_response[: seq_len + 1]  # truncate on the right
    labels = np.where(in_response[1:], ids[1:], IGNORE_INDEX)  # label i predicts token i + 1
    if not (labels != IGNORE_INDEX).any():
        raise BadRecord("response_truncated", f"no response token within seq_len {seq_len}")
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    out = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    inputs[: len(ids) - 1], out[: len(labels)] = ids[:-1], labels
    return inputs, out


def encode_classification(record: dict, labels: list[str], tokenizer, seq_len: int, pad_id: int,
                          text_field: str = "text", label_field: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """-> input_ids (T,) right-padded, label (1,) class index."""
    text, label = record.get(text_field), record.get(label_field)
    if not isinstance(text, str) or not text.strip():
        raise BadRecord("missing_text", f"needs a non-empty string field {text_field!r}")
    if isinstance(label, str) and label in labels:
        index = labels.index(label)
    elif isinstance(label, int) and not isinstance(label, bool) and 0 <= label < len(labels):
        index = label
    else:
        raise BadRecord("unknown_label", f"{label_field}={label!r} is not one of {labels} (or an index)")
    ids = tokenizer.encode(text).ids[:seq_len]  # with the tokenizer's own specials ([CLS] ... [SEP])
    inputs = np.full(seq_len, pad_id, dtype=np.int64)
    inputs[: len(ids)] = ids
    return inputs, np.array([index], dtype=np.int64)


@dataclass
class Examples:
    input_ids: np.ndarray  # (N, T)
    labels: np.ndarray  # (N, T) chat, (N, 1) classification
    rejects: list[dict] = field(default_factory=list)  # {"source", "line", "reason", "detail", "record"}

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def reject_counts(self) -> dict[str, int]:
        return dict(Counter(r["reason"] for r in self.rejects))


def read_jsonl(path: str) -> tuple[list[tuple[int, dict]], list[dict]]:
    """(line number, object) for every parseable line, and rejects for the others."""
    good, bad = [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad.append({"source": path, "line": n, "reason": "invalid_utf8", "detail": str(e), "record": repr(raw[:500])})
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad.append({"source": path, "line": n, "reason": "invalid_json", "detail": str(e), "record": line[:1000]})
                continue
            if not isinstance(obj, dict):
                bad.append({"source": path, "line": n, "reason": "not_an_object", "detail": "", "record": line[:1000]})
                continue
            good.append((n, obj))
    return good, bad


def split_records(records: list, eval_fraction: float, seed: int) -> tuple[list, list]:
    """Seeded held-out split: (train, eval), eval at least one record, train at least one."""
    if len(records) < 2:
        raise ValueError(f"finetune.train_path: {len(records)} usable record(s); a held-out split needs at least 2")
    order = np.random.default_rng(seed).permutation(len(records))
    n_eval = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
    return [records[i] for i in sorted(order[n_eval:])], [records[i] for i in sorted(order[:n_eval])]


def build_examples(records: list[tuple[int, dict]], source: str, encode) -> Examples:
    """Run ``encode(record) -> (input_ids, labels)`` over records, collecting ``BadRecord``s.

    Any other exception from one record (a template or tokenizer choking on its content: a lone
    surrogate, a value the template cannot add) makes it a reject too, reason ``encode_error``.
    """
    inputs, labels, rejects = [], [], []
    for n, record in records:
        try:
            x, y = encode(record)
        except Exception as e:
            bad = e if isinstance(e, BadRecord) else BadRecord("encode_error", f"{type(e).__name__}: {e}")
            rejects.append({"source": source, "line": n, "reason": bad.reason, "detail": str(bad),
                            "record": json.dumps(record)[:1000]})
            continue
        inputs.append(x)
        labels.append(y)
    if not inputs:
        return Examples(np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64), rejects)
    return Examples(np.stack(inputs), np.stack(labels), rejects)
