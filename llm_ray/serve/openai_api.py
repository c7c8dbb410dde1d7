"""OpenAI HTTP API shapes: request parsing and validation, responses, stream chunks, errors.

Every bad request becomes ``APIError`` -> HTTP 400 with OpenAI's error body
``{"error": {"message", "type", "param", "code"}}`` naming the offending field, never a 500.
Pydantic checks types and ranges; ``APIError`` carries the first problem with its field name.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from llm_ray.generation.config import MAX_LOGPROBS, MAX_REPETITION_PENALTY, MAX_TOP_K, MIN_REPETITION_PENALTY, SamplingParams


class APIError(Exception):
    """An error answered in OpenAI's shape. ``headers`` e.g. Retry-After for 503."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


MAX_N = 128  # OpenAI's limit; a replica also caps n at its batch size
MAX_SEED = 2**64 - 1

# Fields of OpenAI's API that change what is generated and that we do not do: refused by name,
# never silently ignored. (Fields without an effect here, e.g. ``store``, ``metadata``,
# ``service_tier``, are accepted.)
UNSUPPORTED = {
    "tools": "tool calling is not supported by this endpoint; send the tools in the prompt instead",
    "tool_choice": "tool calling is not supported by this endpoint",
    "functions": "function calling is not supported by this endpoint",
    "function_call": "function calling is not supported by this endpoint",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "suffix": "suffix (insertion) is not supported",
    "web_search_options": "web search is not supported",
}


def _no_lone_surrogates(text: str, param: str) -> str:
    """JSON may carry "\\ud800" escapes that decode to a lone surrogate: no tokenizer can
    encode it (UTF-8 cannot), so refuse it here with the field's name, not a 500 later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains text that cannot be encoded as UTF-8 (a lone surrogate at index {e.start})") from None
    return text


class _Request(BaseModel):
    # Clients send fields we do not use (store, metadata, ...): accepted; those that would change
    # the output are refused in ``_refuse_unsupported``.
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None  # None: the (only) served model
    max_tokens: Optional[int] = Field(default=None, ge=1, le=2**31 - 1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1, le=MAX_TOP_K)  # vLLM extension; 0 or -1 = off
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=MAX_REPETITION_PENALTY)  # vLLM extension
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(default=None, ge=-(2**63), le=MAX_SEED)
    ignore_eos: bool = False  # vLLM extension (benchmarks): always generate max_tokens tokens
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(default=None, max_length=512)  # logged with the request id
    response_format: Optional[dict] = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if data.get(name) not in (None, [], {}):
                    raise PydanticCustomError("unsupported", f"{name}: {why}", {"param": name})
        return data

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty strings")
        return [_no_lone_surrogates(s, "stop") for s in stops]

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("at most 1024 token biases")
        for k, b in v.items():
            if not k.isdigit():
                raise ValueError(f"keys must be token ids, got {k!r}")
            if not -100.0 <= b <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {b} for token {k}")
        return v

    @field_validator("response_format")
    @classmethod
    def _format(cls, v):
        kind = (v or {}).get("type", "text")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
        if kind == "json_schema" and not isinstance((v.get("json_schema") or {}).get("schema"), dict):
            raise ValueError("json_schema.schema must be a JSON schema object")
        return v

    def json_schema(self) -> tuple[bool, Optional[dict]]:
        """(constrained?, schema or None for any JSON object) from ``response_format``."""
        kind = (self.response_format or {}).get("type", "text")
        if kind == "json_object":
            return True, None
        if kind == "json_schema":
            return True, self.response_format["json_schema"]["schema"]
        return False, None

    def sampling_params(self, max_new_tokens: int, index: int = 0) -> SamplingParams:
        """OpenAI semantics: sampling at the given temperature; temperature 0 = greedy. The n
        choices of one request get seeds seed, seed + 1, ... (each reproducible alone)."""
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias={int(k): b for k, b in (self.logit_bias or {}).items()},
            seed=None if self.seed is None else self.seed + index,
            stop=list(self.stop or []),
            logprobs=self.top_logprob_count(),
        )

    def top_logprob_count(self) -> Optional[int]:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's; accepted, only the final usage chunk is sent


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1, le=2**31 - 1)  # OpenAI's default for completions
    logprobs: Optional[int] = Field(default=None, ge=0, le=5)  # OpenAI: 0..5 alternatives
    best_of: Optional[int] = Field(default=None, ge=1, le=1)  # server-side best-of is not done

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of one string, a string or token ids)")
            v = v[0]
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("must not be empty")
        if isinstance(v, str):
            _no_lone_surrogates(v, "prompt")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v

    def top_logprob_count(self) -> Optional[int]:
        return self.logprobs


class ContentPart(BaseModel):
    """One part of a message's content: only text parts (OpenAI joins them); image, audio and
    file parts are refused by name instead of being dropped."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _encodable(cls, v):
        return _no_lone_surrogates(v, "text")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    @field_validator("content")
    @classmethod
    def _encodable(cls, v):
        if isinstance(v, str):
            _no_lone_surrogates(v, "content")
        return v

    def text(self) -> str:
        """Content as text; a list of text parts is joined with newlines, as OpenAI does."""
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1, le=2**31 - 1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise PydanticCustomError("logprobs", "top_logprobs: needs logprobs set to true", {"param": "top_logprobs"})
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens

    def top_logprob_count(self) -> Optional[int]:
        return (self.top_logprobs or 0) if self.logprobs else None


def _loc(err: dict) -> str:
    """Pydantic's error location as OpenAI's ``param``: messages[0].content[1].type, max_tokens, ..."""
    ctx = err.get("ctx") or {}
    if "param" in ctx:  # our own model validators name the field
        return ctx["param"]
    out = ""
    for part in err.get("loc", ()):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "int", "float", "bool") or "[" in str(part):
            continue  # union branch names (list[ContentPart], literal[...]), not fields
        elif not (isinstance(part, str) and part.startswith("function-")):
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_request(body: bytes, cls: type[_Request]) -> _Request:
    """JSON body -> validated request, or APIError(400) naming the field."""
    try:
        data = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except RecursionError:
        raise bad_request("request body is nested too deeply", code="invalid_json") from None
    except ValidationError as e:
        # A union (content: str | list of parts) reports one error per branch: the deepest
        # location is the one that says what is wrong.
        err = max(e.errors(), key=lambda x: len(x.get("loc", ())))
        param = _loc(err)
        if err.get("type") == "missing":
            raise bad_request(f"'{param}' is a required property", param=param, code="missing_required_parameter") from None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        if "param" in (err.get("ctx") or {}):  # our model validators: the message says it all
            raise bad_request(msg, param=param, code="unsupported_parameter" if err.get("type") == "unsupported" else "invalid_value") from None
        raise bad_request(f"{param}: {msg} (got {_short(err.get('input'))})", param=param, code="invalid_value") from None


# -- responses ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, model: str, obj: str, choices: list[dict], **extra) -> dict:
    """The fields every completion object and stream chunk shares, around its choices."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": choices, **extra}


def completion_response(rid: str, model: str, choices: list[dict], n_prompt: int, n_out: int, fingerprint: str) -> dict:
    """``choices``: {"index", "text", "finish_reason", "logprobs"} each."""
    return _envelope(rid, model, "text_completion", choices, usage=usage(n_prompt, n_out), system_fingerprint=fingerprint)


def chat_response(rid: str, model: str, choices: list[dict], n_prompt: int, n_out: int, fingerprint: str) -> dict:
    """``choices``: {"index", "text", "finish_reason", "logprobs"} each; text becomes the message."""
    out = [{"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "finish_reason": c["finish_reason"], "logprobs": c["logprobs"]} for c in choices]
    return _envelope(rid, model, "chat.completion", out, usage=usage(n_prompt, n_out), system_fingerprint=fingerprint)


def completion_chunk(rid: str, model: str, index: int, text: str, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return _envelope(rid, model, "text_completion", [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}])


def chat_chunk(rid: str, model: str, index: int, delta: dict, finish: Optional[str], logprobs: Optional[dict] = None) -> dict:
    return _envelope(rid, model, "chat.completion.chunk", [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}])


LogprobEntry = tuple  # (token text, token bytes, log-prob, [(alt text, alt bytes, log-prob)])


def chat_logprobs(entries: list[LogprobEntry]) -> dict:
    """OpenAI chat ``logprobs``: each token's text, exact UTF-8 bytes and log-prob, and its
    alternatives'."""
    def one(tok: str, raw: list[int], lp: float) -> dict:
        return {"token": tok, "logprob": lp, "bytes": raw}

    return {"content": [{**one(t, b, lp), "top_logprobs": [one(*alt) for alt in top]} for t, b, lp, top in entries]}


def completion_logprobs(entries: list[LogprobEntry], offset: int = 0) -> dict:
    """Legacy completions ``logprobs``: tokens, token_logprobs, top_logprobs, text_offset."""
    offsets, pos = [], offset
    for tok, *_ in entries:
        offsets.append(pos)
        pos += len(tok)
    return {
        "tokens": [t for t, *_ in entries],
        "token_logprobs": [lp for _, _, lp, _ in entries],
        "top_logprobs": [{a: alp for a, _, alp in top} for *_, top in entries],
        "text_offset": offsets,
    }


def usage_chunk(rid: str, model: str, obj: str, n_prompt: int, n_out: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(n_prompt, n_out)}


def sse(data: Any) -> bytes:
    """One server-sent event; ``data: [DONE]`` ends an OpenAI stream."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llm-ray"}]}
