"""RL prompts: JSONL/Parquet records, local or ``s3://``, turned into chat prompts and token ids.

A record is ``{"prompt": "..."}``, ``{"prompt": [messages]}`` or ``{"messages": [...]}`` ending
in a user turn. Its other fields (a reference answer, a label) are passed to a reward function
as keyword lists, as TRL does with dataset columns. Bad records are quarantined with a reason.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Optional

from llm_ray.config import RecipeError


@dataclass
class PromptSet:
    messages: list[list[dict]] = field(default_factory=list)  # what the reward sees
    ids: list[list[int]] = field(default_factory=list)  # rendered with the generation prompt
    columns: list[dict] = field(default_factory=list)  # each record's other fields
    truncated: int = 0  # prompts cut to max_prompt_tokens (their end kept)

    def __len__(self) -> int:
        return len(self.ids)


def _prompt_messages(record: dict) -> list[dict]:
    from llm_ray.data.preference import _messages
    from llm_ray.data.sft import BadRecord

    if "prompt" in record:
        value = record["prompt"]
        messages = [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, "prompt")
    elif "messages" in record:
        messages = _messages(record["messages"], "messages")
    else:
        raise BadRecord("no_prompt", "needs 'prompt' (a string or messages) or 'messages'")
    if not messages or messages[-1]["role"] != "user":
        raise BadRecord("bad_conversation", "the prompt must end with a user turn")
    if not any(m["content"].strip() for m in messages):
        raise BadRecord("empty_prompt", "the prompt has no text")
    return messages


def load_prompts(path: str, bundle, max_prompt_tokens: int, system_prompt: Optional[str] = None,
                 s3_endpoint: Optional[str] = None, key: str = "finetune.train_path") -> tuple[PromptSet, list[dict]]:
    """(prompts, rejects) of ``path`` for a loaded model folder ``bundle``."""
    from llm_ray.data.preference import _reject, read_preference_records
    from llm_ray.data.sft import BadRecord, ChatTemplate
    from llm_ray.storage import StorageError

    try:
        records, rejects = read_preference_records(path, s3_endpoint)
    except (FileNotFoundError, ValueError, StorageError) as e:
        raise RecipeError(key, str(e)) from None
    template, out = ChatTemplate.for_bundle(bundle), PromptSet()
    for source, line, record in records:
        try:
            if not isinstance(record, dict):
                raise BadRecord("not_an_object", "a record must be a JSON object")
            messages = _prompt_messages(record)
            if system_prompt and messages[0]["role"] != "system":
                messages = [{"role": "system", "content": system_prompt}] + messages
            text = template.render(messages, add_generation_prompt=True)
            try:
                ids = bundle.tokenizer.encode(text, add_special_tokens=False).ids  # the template writes any BOS
            except Exception as e:  # a lone surrogate, ...
                raise BadRecord("unencodable_text", str(e)) from None
        except BadRecord as e:
            rejects.append(_reject(source, line, e.reason, str(e), record))
            continue
        if len(ids) > max_prompt_tokens:
            ids, out.truncated = ids[-max_prompt_tokens:], out.truncated + 1
        out.messages.append(messages)
        out.ids.append(ids)
        out.columns.append({k: v for k, v in record.items() if k not in ("prompt", "messages")})
    if not out.ids:
        raise RecipeError(key, f"no usable prompt in {path} (rejected: {dict(Counter(r['reason'] for r in rejects)) or 'none'})")
    return out, rejects
