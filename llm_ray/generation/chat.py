"""Chat templates: a list of {"role", "content"} messages -> the prompt text the model was tuned on.

Rendered the way ``transformers``' ``apply_chat_template`` renders them: a sandboxed jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
``tojson`` filter that does not HTML-escape, and the globals ``raise_exception`` and
``strftime_now``; the template sees ``messages``, ``add_generation_prompt`` and the special
tokens (``bos_token``, ``eos_token``, ...). A model folder without a template gets ChatML (the
format SmolLM2 and many others use). We render here instead of calling transformers so that a
model folder needs only ``tokenizers`` and jinja2 at generation and serving time.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Optional

# ChatML, as in transformers' docs: one <|im_start|>role ... <|im_end|> block per message.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=16)
def compile_template(template: str):
    """A jinja2 template compiled the way transformers compiles chat templates (cached)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant-token masks in HF): render the body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def validate_messages(messages) -> list[dict]:
    """A chat must be a non-empty list of {"role": str, "content": str} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages: must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}]: must be a dict with string 'role' and 'content', got {m!r}")
    return [dict(m) for m in messages]


def render_chat(
    messages: list[dict],
    template: Optional[str] = None,
    add_generation_prompt: bool = True,
    special_tokens: Optional[dict] = None,
    **kwargs,
) -> str:
    """The prompt text for ``messages`` (``apply_chat_template(..., tokenize=False)``).

    ``special_tokens``: {"bos_token": "<s>", "eos_token": ...} as the template may refer to them.
    """
    messages = validate_messages(messages)
    return compile_template(template or CHATML_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **(special_tokens or {}), **kwargs
    )


def bundle_special_tokens(bundle) -> dict:
    """bos/eos/pad token strings of a model bundle, under the names templates use."""
    tok = bundle.tokenizer
    out = {}
    for name, tid in (("bos_token", bundle.bos_id), ("eos_token", bundle.eos_ids[0] if bundle.eos_ids else None), ("pad_token", bundle.pad_id)):
        if tid is not None:
            out[name] = tok.id_to_token(tid)
    return out


def render_bundle_chat(bundle, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """Render with the bundle's own template (ChatML when it has none) and special tokens."""
    return render_chat(messages, bundle.chat_template, add_generation_prompt, bundle_special_tokens(bundle))
