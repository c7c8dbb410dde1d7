"""Continuous-batching generation engine: one per Serve replica, CPU or GPU, our DecoderLM.

An asyncio task owns the loop; each iteration runs one ``_step`` in a single worker thread
(torch releases the GIL, so the replica's HTTP handlers keep accepting and streaming):

1. admit waiting requests while there are free batch slots (at most
   ``prefill_tokens_per_step`` prompt tokens per step, so decoding never stalls long);
2. prefill the newcomers together (left-padded) into a fresh ``BatchKVCache`` and pick their
   first token, then merge that cache into the running one;
3. ONE decode forward for every active sequence, each with its own rows of the KV cache;
4. hand each new token to its request's asyncio queue; retire finished or aborted sequences
   (their cache rows leave, padding-only columns are trimmed).

Token choice is ``llm_ray.generation.logits.select_next_tokens`` with each row's own
``SamplingParams`` and generator, so a request gets the tokens it would get alone.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional

import torch

from llm_ray.generation.api import left_pad
from llm_ray.generation.config import SamplingParams
from llm_ray.generation.logits import make_generators, select_next_tokens
from llm_ray.serve.batch_cache import BatchKVCache


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
    finish_reason: Optional[str] = None  # "stop" (eos / stop id), "length", "abort"
    aborted: bool = False

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]


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


class ContinuousBatchingEngine:
    """Generates for many requests at once; requests join and leave between decode steps."""

    def __init__(
        self,
        model: torch.nn.Module,
        eos_ids: list[int],
        max_seq_len: int,
        max_batch_size: int = 32,
        max_queue: int = 64,
        prefill_tokens_per_step: int = 2048,
        metrics=None,
        executor: Optional[concurrent.futures.ThreadPoolExecutor] = None,
    ):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.eos_ids = frozenset(int(e) for e in eos_ids)
        self.max_seq_len = max_seq_len
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.prefill_tokens_per_step = prefill_tokens_per_step
        self.metrics = metrics
        self.n_layers = len(model.layers)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []  # row i of the cache is active[i]; only _step touches it
        self.cache = BatchKVCache(self.n_layers)
        self._ids = itertools.count()
        self._wake: Optional[asyncio.Event] = None
        self._loop_task: Optional[asyncio.Task] = None
        # One thread: forward passes run one at a time, off the event loop; pass the executor
        # the model was loaded on (``torch_executor``) so that torch stays on one thread.
        self._executor = executor or torch_executor()
        self.steps = 0
        self.last_batch_size = 0  # rows in the latest decode forward (metrics)
        self.error: Optional[BaseException] = None  # set if the loop died: health turns red

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, prompt_ids: list[int], params: SamplingParams, ignore_eos: bool = False) -> Sequence:
        """Queue a request; raises QueueFullError when ``max_queue`` requests already wait.

        ``ignore_eos`` (benchmarks): generate exactly ``max_new_tokens`` whatever the model says.
        """
        if not prompt_ids:
            raise PromptTooLongError("prompt: must hold at least one token")
        if len(prompt_ids) + params.max_new_tokens > self.max_seq_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens is {params.max_new_tokens}"
            )
        if self.error is not None:
            raise RuntimeError(f"engine stopped: {self.error!r}")
        free_slots = self.max_batch_size - len(self.active)
        if len(self.waiting) >= self.max_queue + max(free_slots, 0):
            raise QueueFullError(f"{len(self.waiting)} requests are waiting for a batch slot")
        self._ensure_loop()
        seq = Sequence(
            id=next(self._ids),
            prompt_ids=list(prompt_ids),
            params=params,
            stop_ids=(frozenset() if ignore_eos else self.eos_ids) | frozenset(params.stop_token_ids),
            generator=make_generators([params], self.device)[0],
            queue=asyncio.Queue(),
        )
        self.waiting.append(seq)
        self._wake.set()
        return seq

    def abort(self, seq: Sequence) -> None:
        """Stop generating for ``seq`` (client gone, timeout, stop string found)."""
        seq.aborted = True
        if seq in self.waiting:
            self.waiting.remove(seq)
            seq.finish_reason = seq.finish_reason or "abort"

    async def token_batches(self, seq: Sequence, deadline: Optional[float] = None, interval_s: float = 0.0) -> AsyncIterator[list[int]]:
        """The token ids of ``seq`` in lists, as they come; ``seq.finish_reason`` is set at the end.

        The first token goes out alone at once (time to first token); after that, tokens that
        arrive within ``interval_s`` of the previous list wait and go together, as do tokens
        already queued when the reader comes back. Fewer, larger messages per stream (Ray Serve
        LLM's ``stream_batching_interval_ms``): each one costs CPU in the replica, the proxy and
        the client, CPU that a CPU replica's forward passes are competing for.
        Past ``deadline`` (``time.monotonic()``), raises RequestTimeoutError and aborts ``seq``.
        """
        batch: list[int] = []
        flush_at: Optional[float] = None  # None: nothing sent yet, the next token goes at once
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.abort(seq)
                raise RequestTimeoutError(f"no answer within the deadline ({len(seq.output_ids)} tokens generated)")
            waits = [t for t in (deadline, flush_at if batch else None) if t is not None]
            try:
                ev: Event = await asyncio.wait_for(seq.queue.get(), timeout=min(waits) - now if waits else None)
            except asyncio.TimeoutError:  # the deadline (checked above) or time to send the batch
                if batch and flush_at is not None and time.monotonic() >= flush_at:
                    yield batch
                    batch, flush_at = [], time.monotonic() + interval_s
                continue
            while True:  # this event, then whatever else is already queued
                if ev.token_id is not None:
                    batch.append(ev.token_id)
                if ev.finish_reason is not None:
                    if batch:
                        yield batch
                    return
                if seq.queue.empty():
                    break
                ev = seq.queue.get_nowait()
            if flush_at is None or time.monotonic() >= flush_at:
                yield batch
                batch, flush_at = [], time.monotonic() + interval_s

    async def tokens(self, seq: Sequence, deadline: Optional[float] = None) -> AsyncIterator[int]:
        """The token ids of ``seq`` one by one (``token_batches`` with no interval)."""
        async for batch in self.token_batches(seq, deadline):
            for tok in batch:
                yield tok

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    # -- the loop ---------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not self.waiting and not self.active:
                    self._wake.clear()
                    await self._wake.wait()
                newcomers = self._admit()
                events = await loop.run_in_executor(self._executor, self._step, newcomers)
                for seq, ev in events:
                    seq.queue.put_nowait(ev)
                if self.metrics is not None:
                    self.metrics.on_step(self.last_batch_size, len(self.waiting), new_tokens=sum(1 for _, e in events if e.finish_reason != "abort"))
        except BaseException as e:  # a broken model must not leave requests hanging
            self.error = e
            for seq in list(self.waiting) + self.active:
                seq.finish_reason = "error"
                seq.queue.put_nowait(Event(finish_reason="error"))
            self.waiting.clear()
            raise

    def _admit(self) -> list[Sequence]:
        """Pop waiting requests into free batch slots, within the per-step prefill budget."""
        newcomers, budget = [], self.prefill_tokens_per_step
        while self.waiting and len(self.active) + len(newcomers) < self.max_batch_size:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                continue
            if newcomers and len(seq.prompt_ids) > budget:
                break  # next step; a single long prompt is always admitted alone
            budget -= len(seq.prompt_ids)
            newcomers.append(self.waiting.popleft())
        return newcomers

    @torch.inference_mode()
    def _step(self, newcomers: list[Sequence]) -> list[tuple[Sequence, Event]]:
        """Prefill newcomers, decode every active row once, retire finished rows (worker thread)."""
        events: list[tuple[Sequence, Event]] = []
        if newcomers:
            cache = BatchKVCache(self.n_layers)
            ids, mask = left_pad([s.prompt_ids for s in newcomers])  # every prompt ends at the last column
            attn = mask.bool().to(self.device) if not bool(mask.all()) else None
            logits = self.model(ids.to(self.device), attention_mask=attn, kv_cache=cache, logits_to_keep=1)[:, -1]  # (N, V)
            self.cache.merge(cache)
            self.active.extend(newcomers)
            events += self._append(newcomers, logits, first=True)
            self._retire()
        self.last_batch_size = len(self.active)
        if self.active:
            last = torch.tensor([[s.last_token] for s in self.active], device=self.device)  # (B, 1)
            logits = self.model(last, kv_cache=self.cache)[:, -1]  # (B, V): one forward, all rows
            events += self._append(self.active, logits)
            self._retire()
        self.steps += 1
        return events

    def _append(self, seqs: list[Sequence], logits: torch.Tensor, first: bool = False) -> list[tuple[Sequence, Event]]:
        params = [s.params for s in seqs]
        needs_history = any(p.repetition_penalty != 1.0 for p in params)
        history = [s.prompt_ids + s.output_ids for s in seqs] if needs_history else None
        next_ids = select_next_tokens(logits, params, history, [s.generator for s in seqs]).tolist()
        now = time.monotonic()
        events = []
        for s, tok in zip(seqs, next_ids):
            if s.aborted:
                s.finish_reason = s.finish_reason or "abort"
                events.append((s, Event(finish_reason=s.finish_reason)))
                continue
            s.output_ids.append(tok)
            if first:
                s.first_token_at = now
                if self.metrics is not None:
                    self.metrics.on_first_token(now - s.arrival)
            if tok in s.stop_ids:
                s.finish_reason = "stop"
            elif len(s.output_ids) >= s.params.max_new_tokens:
                s.finish_reason = "length"
            # An eos token is not text: it ends the stream without being sent.
            events.append((s, Event(token_id=None if s.finish_reason == "stop" else tok, finish_reason=s.finish_reason)))
            if s.finish_reason and self.metrics is not None:
                self.metrics.on_finish(now - s.arrival, len(s.output_ids))
        return events

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self.active) if s.finish_reason is None and not s.aborted]
        if len(keep) < len(self.active):
            self.cache.keep(keep)
            self.active = [self.active[i] for i in keep]

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
