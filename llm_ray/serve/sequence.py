"""What the continuous-batching engine (``engine.py``) schedules and hands back: a request in
flight (``Sequence``), the events its queue receives, a finished RL sample, the errors callers
answer with a status code, and the one torch thread a replica's torch work runs on."""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from llm_ray.generation.config import SamplingParams
from llm_ray.serve.batch_cache import BatchKVCache

# A per-request logits processor (vLLM's v0 signature): (generated ids, (V,) logits) -> (V,) logits.
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


class QueueFullError(RuntimeError):
    """The replica's waiting queue is full: the caller answers 503 with Retry-After."""


class RequestTimeoutError(TimeoutError):
    """A request passed its deadline; its sequence has been aborted."""


class PromptTooLongError(ValueError):
    """Prompt plus max_tokens do not fit the model's context."""


@dataclass
class Sequence:
    """One request in flight: its prompt, settings, output so far and its token queue."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    stop_ids: frozenset
    generator: Optional[torch.Generator]
    queue: asyncio.Queue
    output_ids: list[int] = field(default_factory=list)
    arrival: float = field(default_factory=time.monotonic)
    first_token_at: Optional[float] = None
    finish_reason: Optional[str] = None  # "stop" (eos / stop id), "length", "abort", "error", "preempted"
    aborted: bool = False
    request_id: str = ""  # for logs (the HTTP layer's completion id)
    processors: list = field(default_factory=list)  # LogitsProcessor per request
    group_size: int = 1  # the n sequences of one request are admitted together
    weight_version: int = 0  # the weights that produced output_ids
    error: Optional[str] = None  # why this request failed (finish_reason "error")
    partial: Optional[BatchKVCache] = None  # chunked prefill: this prompt's cache so far
    n_prefilled: int = 0
    # Per output token (filled when params.logprobs is not None): log-prob under the model,
    # under the sampler's distribution, and the params.logprobs most likely (id, log-prob).
    logprobs: list[float] = field(default_factory=list)
    sampler_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


@dataclass
class RolloutOutput:
    """One finished sample for an RL trainer."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # under the model (log_softmax of its logits)
    sampler_logprobs: list[float]  # under the distribution the token was drawn from
    finish_reason: str
    weight_version: int


@dataclass
class Event:
    """What a request's queue receives: a token id, or the end with its reason."""

    token_id: Optional[int] = None
    finish_reason: Optional[str] = None


def torch_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that does ALL of a replica's torch work: loading, dtype probe, forwards.

    Measured on CPU (SmolLM2, batch 32): a decode step took 80 ms when every torch call of the
    process ran on one thread, but 115-170 ms when the model had been loaded (OpenMP regions
    run) on another thread first; small element-wise ops became 2-15x slower. Keeping torch on a
    single thread avoids that (the cause lies in the OpenMP runtime's per-thread pools).
    """
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
