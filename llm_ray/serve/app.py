"""The Ray Serve application: an OpenAI-compatible FastAPI ingress around the batching engine.

Routes (under the application's route prefix): ``POST /v1/completions``,
``POST /v1/chat/completions`` (``"stream": true`` = server-sent events ending in
``data: [DONE]``), ``GET /v1/models``, ``GET /health``.

Limits, outermost first: Serve's ``max_queued_requests`` at the proxy (503 + Retry-After from
Serve's ``backpressure_config``), ``max_ongoing_requests`` per replica, then the engine's own
waiting queue (``max_queue``: 503 + Retry-After with an OpenAI error body), and a per-request
deadline (``request_timeout_s``: 408). Replicas scale with ``autoscaling_config``.

``build_app(args)`` is the application builder named by ``import_path`` in
``jobs/serve_config.yaml``: ``args`` are the ``serve:`` section of a serve recipe (or
``{"recipe": path, "overrides": [...]}``).
"""


# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` class in the
# route signatures (string annotations are read as query parameters after serve.ingress).
import collections
import dataclasses
import hashlib
import hmac
import logging
import math
import time
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.serve import ServeConfig
from llm_ray.generation.chat import render_bundle_chat
from llm_ray.serve.openai_api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    bad_request,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    models_list,
    new_id,
    parse_request,
    sse,
    usage_chunk,
)
from llm_ray.serve.text_stream import TextStream, TokenBytes

logger = logging.getLogger("ray.serve")

api = FastAPI(title="llm-ray", description="OpenAI-compatible endpoint (continuous batching on our DecoderLM)")


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


_HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own errors (unknown route 404, wrong method 405, ...) in OpenAI's shape."""
    messages = {404: f"unknown route {request.method} {request.url.path}", 405: f"method {request.method} is not allowed on {request.url.path}"}
    message = messages.get(exc.status_code, str(exc.detail))
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    body = APIError(exc.status_code, message, _HTTP_TYPES.get(exc.status_code, "invalid_request_error"), code=code).body()
    return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    err = (exc.errors() or [{}])[0]
    param = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
    return JSONResponse(APIError(422, f"{param}: {err.get('msg', 'invalid request')}", param=param).body(), status_code=422)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unexpected error")
    return JSONResponse(APIError(500, f"internal error: {exc!r}", "server_error").body(), status_code=500)


class RateLimiter:
    """At most ``per_minute`` requests per caller in any 60 s window (sliding log), per replica:
    with N replicas a caller may reach N times the rate (a shared limit needs a shared store)."""

    def __init__(self, per_minute: int):
        self.per_minute, self.seen = per_minute, {}

    def admit(self, caller: str, now: float | None = None) -> float:
        """0 when admitted (and counted), else the seconds until the oldest request leaves."""
        now = time.monotonic() if now is None else now
        log = self.seen.setdefault(caller, collections.deque())
        while log and now - log[0] >= 60:
            log.popleft()
        if len(log) >= self.per_minute:
            return 60 - (now - log[0])
        log.append(now)
        return 0.0


@serve.deployment(name="LLMServer", health_check_period_s=10, health_check_timeout_s=30)
@serve.ingress(api)
class LLMServer:
    """One replica: the model, its tokenizer and a ``ContinuousBatchingEngine``."""

    def __init__(self, config: dict):
        import torch

        from llm_ray.bundle import load_bundle
        from llm_ray.serve.engine import ContinuousBatchingEngine, torch_executor
        from llm_ray.serve.metrics import EngineMetrics
        from llm_ray.train.device import local_device, pick_inference_dtype

        self.cfg = from_dict(ServeConfig, config, "serve")

        def setup():  # on the engine's thread: all torch work of the replica stays there
            if self.cfg.torch_threads:
                torch.set_num_threads(self.cfg.torch_threads)
            device = local_device()
            dtype = pick_inference_dtype(self.cfg.dtype, device)
            return device, dtype, load_bundle(self.cfg.model, device=device, dtype=dtype)

        executor = torch_executor()
        device, self.dtype, bundle = executor.submit(setup).result()
        self.bundle = bundle
        self.tokenizer = bundle.tokenizer
        self.token_bytes = TokenBytes(bundle.tokenizer)
        self.model_name = self.cfg.served_name
        self.max_seq_len = bundle.cfg.max_seq_len
        self.key_hashes = [bytes.fromhex(h) for h in self.cfg.api_key_hashes()]  # never the keys themselves
        self.limiter = RateLimiter(self.cfg.rate_limit_per_minute) if self.cfg.rate_limit_per_minute else None
        self.created = int(time.time())
        self._grammar_tokenizer = None  # llguidance's view of the tokenizer, built on first use
        self._grammars: dict[str, str] = {}  # compiled response_format grammars by schema
        self.metrics = EngineMetrics(self.model_name)
        self.engine = ContinuousBatchingEngine(
            bundle.model,
            eos_ids=bundle.eos_ids,
            max_seq_len=self.max_seq_len,
            max_batch_size=self.cfg.max_batch_size,
            max_queue=self.cfg.max_queue,
            prefill_tokens_per_step=self.cfg.prefill_tokens_per_step,
            prefix_cache_tokens=self.cfg.prefix_cache_tokens,
            metrics=self.metrics,
            executor=executor,
        )
        logger.info("serving %s (%s, %s) on %s", self.model_name, bundle.path, self.dtype, device)

    # -- Serve hooks ------------------------------------------------------------------------------
    def check_health(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"engine loop stopped: {self.engine.error!r}")

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()

    # -- helpers ----------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        """The caller's key checked against the stored sha256 digests in constant time (every
        digest compared, no early exit), then its rate limit; 401 or 429 in OpenAI's shape."""
        caller = request.client.host if request.client else "?"
        if self.key_hashes:
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(key.strip().encode()).digest()
            matches = [hmac.compare_digest(digest, h) for h in self.key_hashes]
            if scheme.lower() != "bearer" or not any(matches):
                raise APIError(
                    401,
                    "missing or invalid API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            caller = digest.hex()[:16]
        if self.limiter is not None:
            wait = self.limiter.admit(caller)
            if wait > 0:
                raise APIError(429, f"rate limit reached: {self.cfg.rate_limit_per_minute} requests per minute for this key; "
                               f"retry in {math.ceil(wait)} s", "rate_limit_error", code="rate_limit_exceeded",
                               headers={"Retry-After": str(math.ceil(wait))})

    def _check_model(self, req) -> None:
        if req.model is not None and req.model != self.model_name:
            raise bad_request(f"model '{req.model}' does not exist; this endpoint serves '{self.model_name}'", param="model", code="model_not_found")

    def _encode(self, text: str, chat: bool) -> list[int]:
        # As llm_ray.generation.generate: a rendered chat already holds its special tokens.
        try:
            return self.tokenizer.encode(text, add_special_tokens=not chat).ids
        except Exception as e:  # the request's text, not the server: 400
            raise bad_request(f"{'messages' if chat else 'prompt'}: the tokenizer cannot encode this text: {e}", param="messages" if chat else "prompt") from None

    async def _body(self, request: Request) -> bytes:
        """The request body, refused with 413 past ``max_request_bytes`` (before reading it all)."""
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the limit of {limit} bytes", code="request_too_large")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        return body

    def _plan(self, req, prompt_ids: list[int], requested: Optional[int]):
        """Validate the prompt against the context; SamplingParams for the engine."""
        n = len(prompt_ids)
        if n >= self.max_seq_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the prompt has {n} tokens",
                param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                code="context_length_exceeded",
            )
        if requested is not None and n + requested > self.max_seq_len:
            raise bad_request(
                f"this model's maximum context length is {self.max_seq_len} tokens; the prompt has {n} tokens "
                f"and max_tokens asks for {requested} more",
                param="max_tokens",
                code="context_length_exceeded",
            )
        max_new = requested if requested is not None else min(self.cfg.default_max_tokens, self.max_seq_len - n)
        try:
            return req.sampling_params(max_new)
        except ValueError as e:  # SamplingParams names the field first: "top_p: ..."
            raise bad_request(str(e), param=str(e).split(":", 1)[0]) from None

    async def _constraint(self, req):
        """A factory of per-sequence JSON grammar processors for ``response_format``, or None."""
        import asyncio
        import json as _json

        from llm_ray.generation.grammar import JsonConstraint, grammar_tokenizer, json_grammar

        constrained, schema = req.json_schema()
        if not constrained:
            return None
        if self._grammar_tokenizer is None:  # about a second for a 49k vocabulary: off the event loop, once
            self._grammar_tokenizer = await asyncio.get_running_loop().run_in_executor(None, grammar_tokenizer, self.tokenizer, self.bundle.eos_ids)
        key = _json.dumps(schema, sort_keys=True)
        grammar = self._grammars.get(key)
        if grammar is None:
            try:
                grammar = json_grammar(schema)
            except ValueError as e:
                raise bad_request(f"response_format: {e}", param="response_format") from None
            self._grammars[key] = grammar
        tok = self._grammar_tokenizer
        return lambda: [JsonConstraint(tok, grammar)]

    def _submit(self, prompt_ids: list[int], params: list, ignore_eos: bool = False, request_id: str = "", make_processors=None):
        from llm_ray.serve.engine import PromptTooLongError, QueueFullError

        try:
            return self.engine.submit_n(prompt_ids, params, ignore_eos=ignore_eos, request_id=request_id, make_processors=make_processors)
        except QueueFullError as e:
            self.metrics.on_rejected()
            raise APIError(
                503,
                f"server overloaded ({e}); retry later",
                "server_overloaded",
                code="queue_full",
                headers={"Retry-After": str(max(1, round(self.cfg.retry_after_s)))},
            ) from None
        except PromptTooLongError as e:
            raise bad_request(str(e), param="max_tokens", code="context_length_exceeded") from None

    async def _generate(self, seq, stream_text) -> AsyncIterator[tuple[str, int]]:
        """(text delta, tokens consumed so far) of ``seq`` until it ends or its deadline passes
        (then aborts it). A failure of this request alone in the engine is a 500 for it alone."""
        from llm_ray.serve.engine import RequestTimeoutError

        try:
            deadline = seq.arrival + self.cfg.request_timeout_s
            consumed = 0
            async for batch in self.engine.token_batches(seq, deadline, self.cfg.stream_interval_ms / 1000):
                delta = "".join(stream_text.push(tok) for tok in batch)  # push is a no-op once stopped
                consumed += len(batch)
                if delta:
                    yield delta, consumed
                if stream_text.stopped:  # a stop string: the engine may stop this sequence
                    seq.finish_reason = "stop"
                    break
            if seq.finish_reason == "error":
                raise APIError(500, f"generation failed in the engine for request {seq.request_id}: {seq.error}", "server_error")
            tail = stream_text.finish()
            if tail:
                yield tail, consumed
        except RequestTimeoutError:
            raise APIError(408, f"request timed out after {self.cfg.request_timeout_s}s", "timeout", code="timeout") from None
        finally:
            self.engine.abort(seq)  # frees a running row (timeout, stop string); no-op once finished

    def _logprob_entries(self, seq, start: int, stop: int) -> list:
        """(token text, bytes, log-prob, [(alternative text, bytes, log-prob)]) of output tokens
        start..stop."""
        dec, raw = self.tokenizer.decode, self.token_bytes
        n = min(stop, len(seq.logprobs))
        return [
            (dec([seq.output_ids[i]]), raw(seq.output_ids[i]), seq.logprobs[i], [(dec([t]), raw(t), lp) for t, lp in seq.top_logprobs[i]])
            for i in range(start, n)
        ]

    def _logprobs_obj(self, seq, chat: bool, start: int, stop: int, offset: int = 0) -> Optional[dict]:
        if seq.params.logprobs is None:
            return None
        entries = self._logprob_entries(seq, start, stop)
        return chat_logprobs(entries) if chat else completion_logprobs(entries, offset)

    @staticmethod
    def _finish(seq, stream_text) -> str:
        return "stop" if stream_text.stopped else (seq.finish_reason or "stop")

    async def _respond(self, req, prompt_ids: list[int], requested: Optional[int], chat: bool):
        import asyncio

        if req.n > self.cfg.max_batch_size:
            raise bad_request(f"n: at most {self.cfg.max_batch_size} choices per request on this endpoint (its batch size), got {req.n}", param="n")
        vocab = self.bundle.cfg.vocab_size
        bad = [k for k in (req.logit_bias or {}) if int(k) >= vocab]
        if bad:
            raise bad_request(f"logit_bias: token id {bad[0]} is not in this model's vocabulary [0, {vocab})", param="logit_bias")
        params = self._plan(req, prompt_ids, requested)
        rid = new_id("chatcmpl" if chat else "cmpl")
        if req.user:
            logger.info("request %s from user %r", rid, req.user)
        if self.cfg.log_prompts:  # off by default: prompts may hold personal data
            logger.info("request %s prompt %r", rid, self.tokenizer.decode(list(prompt_ids)))
        make_processors = await self._constraint(req)
        seqs = self._submit(prompt_ids, [params.replace(seed=None if req.seed is None else req.seed + i) for i in range(req.n)], req.ignore_eos, rid, make_processors)
        streams = [TextStream(self.tokenizer, params.stop) for _ in seqs]
        name = self.model_name
        fingerprint = f"llm-ray-w{self.engine.weight_version}"

        if not req.stream:
            async def run(seq, st):
                async for _ in self._generate(seq, st):
                    pass

            try:
                await asyncio.gather(*(run(q, st) for q, st in zip(seqs, streams)))
            finally:
                for q in seqs:
                    self.engine.abort(q)
            choices = [
                {"index": i, "text": st.final_text(), "finish_reason": self._finish(q, st), "logprobs": self._logprobs_obj(q, chat, 0, len(q.output_ids))}
                for i, (q, st) in enumerate(zip(seqs, streams))
            ]
            make = chat_response if chat else completion_response
            return JSONResponse(make(rid, name, choices, len(prompt_ids), sum(len(q.output_ids) for q in seqs), fingerprint))

        async def events():
            merged: asyncio.Queue = asyncio.Queue()

            async def pump(i, seq, st):  # one choice's deltas into the shared queue
                sent, chars = 0, 0
                try:
                    async for delta, consumed in self._generate(seq, st):
                        lp = self._logprobs_obj(seq, chat, sent, consumed, chars)
                        sent, chars = consumed, chars + len(delta)
                        merged.put_nowait((i, delta, lp, None))
                    merged.put_nowait((i, "", None, self._finish(seq, st)))
                except APIError as e:
                    merged.put_nowait((i, None, None, e))

            tasks = [asyncio.ensure_future(pump(i, q, st)) for i, (q, st) in enumerate(zip(seqs, streams))]
            try:
                if chat:
                    for i in range(len(seqs)):
                        yield sse(chat_chunk(rid, name, i, {"role": "assistant", "content": ""}, None))
                done = 0
                while done < len(seqs):
                    i, delta, lp, end = await merged.get()
                    if isinstance(end, APIError):  # headers are gone: the error travels as an event
                        yield sse(end.body())
                        done += 1
                        continue
                    if end is not None:
                        done += 1
                        yield sse(chat_chunk(rid, name, i, {}, end) if chat else completion_chunk(rid, name, i, "", end))
                    else:
                        yield sse(chat_chunk(rid, name, i, {"content": delta}, None, lp) if chat else completion_chunk(rid, name, i, delta, None, lp))
                if req.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield sse(usage_chunk(rid, name, obj, len(prompt_ids), sum(len(q.output_ids) for q in seqs)))
            finally:
                for t in tasks:
                    t.cancel()
                for q in seqs:
                    self.engine.abort(q)  # client disconnected or done: free the batch slots
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # -- routes -----------------------------------------------------------------------------------
    @api.get("/health")
    async def health(self) -> JSONResponse:
        ok = self.engine.error is None
        body = {"status": "ok" if ok else "error", "model": self.model_name, "running": len(self.engine.active), "waiting": self.engine.queue_depth}
        return JSONResponse(body, status_code=200 if ok else 503)

    @api.get("/v1/models")
    async def models(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return JSONResponse(models_list(self.model_name, self.created))

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        self._authorize(request)
        req = parse_request(await self._body(request), CompletionRequest)
        self._check_model(req)
        prompt_ids = list(req.prompt) if isinstance(req.prompt, list) else self._encode(req.prompt, chat=False)
        if isinstance(req.prompt, list) and any(not (0 <= t < self.bundle.cfg.vocab_size) for t in prompt_ids):
            raise bad_request(f"prompt: token ids must be in [0, {self.bundle.cfg.vocab_size})", param="prompt")
        return await self._respond(req, prompt_ids, req.max_tokens, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        self._authorize(request)
        req = parse_request(await self._body(request), ChatCompletionRequest)
        self._check_model(req)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = render_bundle_chat(self.bundle, messages)  # the model's template, else ChatML
        except Exception as e:  # a template that rejects these messages (e.g. role order)
            raise bad_request(f"messages: the chat template rejected them: {e}", param="messages") from None
        return await self._respond(req, self._encode(text, chat=True), req.requested_max_tokens(), chat=True)


def _cluster_has_gpu() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def deployment_for(cfg: ServeConfig):
    """``LLMServer`` with the replicas, autoscaling, limits and resources of ``cfg``, bound."""
    use_gpu = _cluster_has_gpu() if cfg.use_gpu is None else cfg.use_gpu
    actor = {"num_cpus": cfg.cpus_per_replica, "num_gpus": 1 if use_gpu else 0}
    if cfg.torch_threads:
        actor["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(cfg.torch_threads)}}
    return LLMServer.options(**cfg.deployment_options(), ray_actor_options=actor).bind(dataclasses.asdict(cfg))


def build_app(args: dict):
    """Serve application builder (``import_path: llm_ray.serve.app:build_app``).

    ``args``: the fields of ``ServeConfig`` (the ``serve:`` section of a serve recipe), or
    ``{"recipe": "jobs/recipes/serve-smollm2.yaml", "overrides": ["serve.max_batch_size=16"]}``.
    """
    args = dict(args or {})
    recipe, overrides = args.pop("recipe", None), list(args.pop("overrides", []))
    section = dict((load_yaml(recipe).get("serve") or {}) if recipe else {})
    section.update(args)
    data = apply_overrides({"serve": section}, overrides)
    return deployment_for(from_dict(ServeConfig, data["serve"], "serve"))


def run(cfg: ServeConfig, blocking: bool = False):
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the application."""
    serve.start(http_options=cfg.http_options())
    handle = serve.run(deployment_for(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=blocking)
    return handle


def url(cfg: ServeConfig) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"{cfg.scheme}://{host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


__all__ = ["LLMServer", "build_app", "deployment_for", "run", "url"]
