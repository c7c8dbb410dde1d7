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

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llm_ray.generation.config import SamplingParams


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


class _Request(BaseModel):
    # Clients send fields we do not use (user, logit_bias, ...): accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: Optional[str] = None  # None: the (only) served model
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)  # vLLM extension; 0 = off
    repetition_penalty: float = Field(default=1.0, gt=0.0)  # vLLM extension; 1 = off
    n: int = Field(default=1, ge=1, le=1)  # one choice per request
    stream: bool = False
    stream_options: Optional[dict] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = None
    ignore_eos: bool = False  # vLLM extension (benchmarks): always generate max_tokens tokens
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0)  # not implemented: only 0
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0)

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("at most 4 non-empty strings")
        return stops

    def sampling_params(self, max_new_tokens: int) -> SamplingParams:
        # OpenAI semantics: sampling at the given temperature; temperature 0 = greedy.
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            do_sample=True,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            stop=list(self.stop or []),
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("one prompt per request (a list of one string, a string or token ids)")
            v = v[0]
        if isinstance(v, (str, list)) and len(v) == 0:
            raise ValueError("must not be empty")
        return v

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None

    def text(self) -> str:
        """Content as text; a list of parts keeps its text parts."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
        return self.content or ""


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


def _loc(err: dict) -> str:
    """Pydantic's error location as OpenAI's ``param``: messages[0].role, max_tokens, ..."""
    out = ""
    for part in err.get("loc", ()):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[str]", "list[int]", "list[dict[any,any]]", "int", "float", "bool"):
            continue  # union branch names, not fields
        elif not (isinstance(part, str) and part.startswith(("literal[", "function-"))):
            out += ("." if out else "") + str(part)
    return out


def parse_request(body: bytes, cls: type[_Request]) -> _Request:
    """JSON body -> validated request, or APIError(400) naming the field."""
    try:
        data = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        param = _loc(err)
        if err.get("type") == "missing":
            raise bad_request(f"'{param}' is a required property", param=param, code="missing_required_parameter") from None
        msg = err.get("msg", "invalid value").removeprefix("Value error, ")
        raise bad_request(f"{param}: {msg} (got {err.get('input')!r})", param=param, code="invalid_value") from None


# -- responses ---------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def _envelope(rid: str, model: str, obj: str, choice: dict, **extra) -> dict:
    """The fields every completion object and stream chunk shares, around its one choice."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model,
            "choices": [{"index": 0, **choice, "logprobs": None}], **extra}


def completion_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_out: int) -> dict:
    return _envelope(rid, model, "text_completion", {"text": text, "finish_reason": finish}, usage=usage(n_prompt, n_out))


def chat_response(rid: str, model: str, text: str, finish: str, n_prompt: int, n_out: int) -> dict:
    message = {"role": "assistant", "content": text}
    return _envelope(rid, model, "chat.completion", {"message": message, "finish_reason": finish}, usage=usage(n_prompt, n_out))


def completion_chunk(rid: str, model: str, text: str, finish: Optional[str]) -> dict:
    return _envelope(rid, model, "text_completion", {"text": text, "finish_reason": finish})


def chat_chunk(rid: str, model: str, delta: dict, finish: Optional[str]) -> dict:
    return _envelope(rid, model, "chat.completion.chunk", {"delta": delta, "finish_reason": finish})


def usage_chunk(rid: str, model: str, obj: str, n_prompt: int, n_out: int) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": usage(n_prompt, n_out)}


def sse(data: Any) -> bytes:
    """One server-sent event; ``data: [DONE]`` ends an OpenAI stream."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


def models_list(name: str, created: int) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llm-ray"}]}
