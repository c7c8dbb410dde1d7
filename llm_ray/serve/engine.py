"""Continuous-batching generation engine: one per Serve replica, CPU or GPU, our DecoderLM.

An asyncio task owns the loop; each iteration runs one ``_step`` in a single worker thread
(torch releases the GIL, so the replica's HTTP handlers keep accepting and streaming):

1. admit waiting requests while there are free batch slots (at most
   ``prefill_tokens_per_step`` prompt tokens per step, so decoding never stalls long); a
   longer prompt is prefilled in chunks of that budget, one per step (chunked prefill), in
   its own cache that joins the batch once the prompt is in;
2. prefill the newcomers together (left-padded) into a fresh ``BatchKVCache``, each from the
   longest prefix of its prompt in the ``PrefixCache``, pick their first token, then merge
   that cache into the running one;
3. ONE decode forward for every active sequence, each with its own rows of the KV cache;
4. hand each new token to its request's asyncio queue; retire finished or aborted sequences
   (their cache rows leave, padding-only columns are trimmed).

Token choice is ``llm_ray.generation.logits`` with each row's own ``SamplingParams`` and
generator, so a request gets the tokens it would get alone. Identical prompts admitted in the
same step (the ``n`` samples of one request) are prefilled once and their cache row copied.

Fault isolation: a failure in one row's token choice (its parameters, its logits processors)
fails that request alone (``finish_reason`` "error", the cause in ``seq.error``); a failing
prefill is retried row by row so only the rows that fail alone fail. Only a decode forward
that fails for the whole batch (out of memory, a broken model) stops the engine (``error``
set: ``/health`` turns red and Serve replaces the replica).

Rollout worker (RL): ``generate`` returns tokens with their log-probs under the model and
under the sampler, tagged with ``weight_version``; ``update_weights(version, tensors)`` swaps
the weights between steps, letting sequences in flight finish on the old version ("finish") or
preempting them for a re-run on the new one ("rerun"; ``generate`` re-submits them itself).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import logging
import time
from typing import AsyncIterator, Callable, Literal, Mapping, Optional

import torch

from llm_ray.generation.api import left_pad
from llm_ray.generation.config import SamplingParams
from llm_ray.generation.logits import choose_tokens, chosen_logprobs, make_generators, process_logits
from llm_ray.serve.batch_cache import BatchKVCache
from llm_ray.serve.prefix_cache import PrefixCache
from llm_ray.serve.sequence import (  # noqa: F401  (re-exported: callers import them from here)
    Event,
    LogitsProcessor,
    PromptTooLongError,
    QueueFullError,
    RequestTimeoutError,
    RolloutOutput,
    Sequence,
    torch_executor,
)

logger = logging.getLogger("ray.serve")

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
        prefix_cache_tokens: int = 0,
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
        self.prefilling: list[Sequence] = []  # long prompts prefilled chunk by chunk (hold a slot)
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
        self.prefix_cache = PrefixCache(prefix_cache_tokens)  # 0 tokens = off
        self.weight_version = 0
        self._paused = False  # update_weights: admit nobody until the swap is done
        self._preempt = False  # update_weights(rerun): end the rows in flight at the next step

    # -- requests ---------------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        ignore_eos: bool = False,
        request_id: str = "",
        processors: Optional[list[LogitsProcessor]] = None,
    ) -> Sequence:
        """Queue a request; raises QueueFullError when ``max_queue`` requests already wait.

        ``ignore_eos`` (benchmarks): generate exactly ``max_new_tokens`` whatever the model says.
        """
        return self.submit_n(prompt_ids, [params], ignore_eos, request_id, processors)[0]

    def submit_n(
        self,
        prompt_ids: list[int],
        params: list[SamplingParams],
        ignore_eos: bool = False,
        request_id: str = "",
        processors: Optional[list[LogitsProcessor]] = None,
        make_processors: Optional[Callable[[], list[LogitsProcessor]]] = None,
    ) -> list[Sequence]:
        """Queue ``len(params)`` samples of one prompt, admitted together, prefilled once.

        ``processors`` are shared by the samples (stateless ones); ``make_processors()`` gives
        each sample its own (stateful ones, e.g. a grammar matcher)."""
        if not prompt_ids:
            raise PromptTooLongError("prompt: must hold at least one token")
        longest = max(p.max_new_tokens for p in params)
        if len(prompt_ids) + longest > self.max_seq_len:
            raise PromptTooLongError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but the prompt has "
                f"{len(prompt_ids)} tokens and max_tokens is {longest}"
            )
        if len(params) > self.max_batch_size:
            raise ValueError(f"n: at most {self.max_batch_size} samples per request (the batch size), got {len(params)}")
        if self.error is not None:
            raise RuntimeError(f"engine stopped: {self.error!r}")
        free_slots = self.max_batch_size - len(self.active)
        if len(self.waiting) + len(params) > self.max_queue + max(free_slots, 0):
            raise QueueFullError(f"{len(self.waiting)} requests are waiting for a batch slot")
        self._ensure_loop()
        seqs = []
        for p in params:
            seqs.append(Sequence(
                id=next(self._ids),
                prompt_ids=list(prompt_ids),
                params=p,
                stop_ids=(frozenset() if ignore_eos else self.eos_ids) | frozenset(p.stop_token_ids),
                generator=make_generators([p], self.device)[0],
                queue=asyncio.Queue(),
                request_id=request_id,
                processors=list(processors or []) + (make_processors() if make_processors else []),
                group_size=len(params),
            ))
        self.waiting.extend(seqs)
        self._wake.set()
        return seqs

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

    # -- rollout worker API (in-process) ----------------------------------------------------------
    async def generate(self, prompt_ids: list[int], params: list[SamplingParams], ignore_eos: bool = False) -> list[RolloutOutput]:
        """``len(params)`` samples of one prompt with per-token log-probs and the weight version.

        A sample preempted by ``update_weights(..., in_flight="rerun")`` is generated again on
        the new weights, so every output comes whole from one version.
        """
        params = [p if p.logprobs is not None else p.replace(logprobs=0) for p in params]
        outs: list[Optional[RolloutOutput]] = [None] * len(params)
        todo = list(range(len(params)))
        while todo:
            seqs = self.submit_n(prompt_ids, [params[i] for i in todo], ignore_eos)
            for seq in seqs:
                async for _ in self.token_batches(seq):
                    pass
            again = []
            for i, seq in zip(todo, seqs):
                if seq.finish_reason == "preempted":
                    again.append(i)
                elif seq.finish_reason == "error":
                    raise RuntimeError(f"generation failed: {seq.error}")
                else:
                    outs[i] = RolloutOutput(list(prompt_ids), list(seq.output_ids), list(seq.logprobs),
                                            list(seq.sampler_logprobs), seq.finish_reason or "length", seq.weight_version)
            todo = again
        return outs  # type: ignore[return-value]

    async def update_weights(
        self, version: int, named_tensors: Mapping[str, torch.Tensor], in_flight: Literal["finish", "rerun"] = "finish"
    ) -> None:
        """Swap in new weights between two steps; outputs after it carry ``version``.

        ``finish``: admission pauses until the sequences in flight finish on the old weights.
        ``rerun``: they end at once with finish_reason "preempted" (``generate`` re-runs them).
        Names and shapes are checked before any weight changes: a bad update changes nothing.
        """
        if in_flight not in ("finish", "rerun"):
            raise ValueError(f"in_flight: must be 'finish' or 'rerun', got {in_flight!r}")
        current = dict(self.model.named_parameters())
        for name, t in named_tensors.items():
            if name not in current:
                raise KeyError(f"update_weights: the model has no parameter {name!r}")
            if tuple(t.shape) != tuple(current[name].shape):
                raise ValueError(f"update_weights: {name} has shape {tuple(current[name].shape)}, got {tuple(t.shape)}")
        self._paused = True
        try:
            if in_flight == "rerun" and (self.active or self.prefilling):
                self._preempt = True
                self._wake.set()
            # The loop finishes (or preempts) the rows in flight; poll for that between its steps.
            while (self.active or self.prefilling or self._preempt) and self._loop_task is not None and not self._loop_task.done():
                await asyncio.sleep(0.005)

            def load():
                with torch.no_grad():
                    for name, t in named_tensors.items():
                        current[name].copy_(t.to(device=current[name].device, dtype=current[name].dtype))

            await asyncio.get_running_loop().run_in_executor(self._executor, load)
            self.prefix_cache.clear()  # KV computed by the old weights
            self.weight_version = int(version)
        finally:
            self._paused, self._preempt = False, False
            if self._wake is not None:
                self._wake.set()

    # -- the loop ---------------------------------------------------------------------------------
    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._wake = asyncio.Event()
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if self._preempt:
                    for seq in self.active + self.prefilling:
                        seq.finish_reason = "preempted"
                        seq.queue.put_nowait(Event(finish_reason="preempted"))
                    self.active, self.prefilling, self.cache, self._preempt = [], [], BatchKVCache(self.n_layers), False
                if not self.active and not self.prefilling and (self._paused or not self.waiting):
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                newcomers = [] if self._paused else self._admit()
                events = await loop.run_in_executor(self._executor, self._step, newcomers)
                for seq, ev in events:
                    seq.queue.put_nowait(ev)
                if self.metrics is not None:
                    self.metrics.on_step(self.last_batch_size, len(self.waiting), new_tokens=sum(1 for _, e in events if e.token_id is not None))
        except BaseException as e:  # a broken model must not leave requests hanging
            stopped = isinstance(e, asyncio.CancelledError)  # shutdown: not a fault of the engine
            if not stopped:
                self.error = e
            for seq in list(self.waiting) + self.active + self.prefilling:
                seq.finish_reason = "abort" if stopped else "error"
                seq.error = f"engine stopped: {e!r}"
                seq.queue.put_nowait(Event(finish_reason=seq.finish_reason))
            self.waiting.clear()
            raise

    def _admit(self) -> list[Sequence]:
        """Pop waiting requests into free batch slots, within the per-step prefill budget.

        The ``group_size`` samples of one request come in together (they share one prefill).
        A prompt longer than the budget goes to ``prefilling``: chunked prefill, one chunk per
        step between decode steps, so it never stalls the running rows for its whole length.
        """
        newcomers, budget = [], self.prefill_tokens_per_step
        if self.prefilling:
            budget -= min(budget, len(self.prefilling[0].prompt_ids) - self.prefilling[0].n_prefilled)
        while self.waiting:
            seq = self.waiting[0]
            if seq.aborted:
                self.waiting.popleft()
                continue
            group = [s for s in itertools.islice(self.waiting, 0, seq.group_size)]
            if len(self.active) + len(self.prefilling) + len(newcomers) + len(group) > self.max_batch_size:
                break
            if len(seq.prompt_ids) > self.prefill_tokens_per_step and seq.group_size == 1:
                self.prefilling.append(self.waiting.popleft())
                continue
            if newcomers and len(seq.prompt_ids) > budget:
                break  # next step
            budget -= len(seq.prompt_ids)
            for _ in group:
                newcomers.append(self.waiting.popleft())
        return newcomers

    def _prefill_chunk(self, seq: Sequence, budget: int) -> tuple[int, Optional[torch.Tensor]]:
        """The next chunk (<= ``budget`` tokens) of a long prompt into ``seq.partial``;
        (tokens done, the (1, V) last logits once the whole prompt is in, else None)."""
        prompt = seq.prompt_ids
        if seq.partial is None:
            n, kv = self.prefix_cache.lookup(prompt)
            seq.partial, seq.n_prefilled = BatchKVCache.from_prefixes(self.n_layers, [kv], [n]), n
        start = seq.n_prefilled
        end = min(len(prompt), start + max(budget, 1))
        ids = torch.tensor([prompt[start:end]], device=self.device)
        logits = self.model(ids, kv_cache=seq.partial, logits_to_keep=1)[:, -1]  # (1, V)
        seq.n_prefilled = end
        if end < len(prompt):
            return end - start, None
        self.prefix_cache.store(prompt, seq.partial.row_kv(0))
        return end - start, logits

    def _fail(self, seq: Sequence, exc: BaseException) -> tuple[Sequence, Event]:
        """This request alone fails (500 for it); the engine goes on with the others."""
        seq.finish_reason, seq.error = "error", f"{type(exc).__name__}: {exc}"
        logger.error("request %s failed in the engine: %r", seq.request_id or seq.id, exc)
        return seq, Event(finish_reason="error")

    def _prefill(self, seqs: list[Sequence]) -> tuple[BatchKVCache, torch.Tensor]:
        """One forward over the distinct prompts of ``seqs``, each from its longest cached
        prefix on; (cache, (N, V) logits), one row per seq."""
        unique: dict[tuple, int] = {}
        rows = [unique.setdefault(tuple(s.prompt_ids), len(unique)) for s in seqs]
        prompts = [list(p) for p in unique]
        found = [self.prefix_cache.lookup(p) for p in prompts]  # (n cached, per-layer kv)
        cache = BatchKVCache.from_prefixes(self.n_layers, [kv for _, kv in found], [n for n, _ in found])
        ids, mask = left_pad([p[n:] for p, (n, _) in zip(prompts, found)])  # every suffix ends at the last column
        attn = mask.bool().to(self.device) if not bool(mask.all()) else None
        # The decoder joins the cache's mask (padding between a short prefix and its suffix
        # included) with this one and counts positions over real tokens only.
        logits = self.model(ids.to(self.device), attention_mask=attn, kv_cache=cache, logits_to_keep=1)[:, -1]  # (U, V)
        if self.prefix_cache.enabled:
            for u, p in enumerate(prompts):
                self.prefix_cache.store(p, cache.row_kv(u))
            if self.metrics is not None:
                self.metrics.on_prefix_cache(self.prefix_cache.hit_rate, sum(n for n, _ in found), sum(len(p) for p in prompts))
        if len(unique) < len(seqs):  # n samples of one prompt: copy its cache row, not its forward
            cache.keep(rows)
            logits = logits[torch.tensor(rows, device=logits.device)]
        return cache, logits

    @torch.inference_mode()
    def _step(self, newcomers: list[Sequence]) -> list[tuple[Sequence, Event]]:
        """Prefill newcomers, decode every active row once, retire finished rows (worker thread)."""
        events: list[tuple[Sequence, Event]] = []
        budget = self.prefill_tokens_per_step - sum(len(s.prompt_ids) for s in newcomers)
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            if seq.aborted:
                self.prefilling.pop(0)
                events.append((seq, Event(finish_reason=seq.finish_reason or "abort")))
                continue
            try:
                done, logits = self._prefill_chunk(seq, budget)
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as e:
                self.prefilling.pop(0)
                events.append(self._fail(seq, e))
                continue
            budget -= done
            if logits is None:
                break  # more chunks next step
            self.prefilling.pop(0)
            self.cache.merge(seq.partial)
            seq.partial = None
            seq.weight_version = self.weight_version
            self.active.append(seq)
            events += self._append([seq], logits, first=True)
            self._retire()
        if newcomers:
            try:
                parts = [(newcomers, self._prefill(newcomers))]
            except (torch.OutOfMemoryError, MemoryError):
                raise  # engine-wide
            except Exception as e:  # one bad row must not fail the others: retry each alone
                parts = []
                for s in newcomers:
                    try:
                        parts.append(([s], self._prefill([s])))
                    except (torch.OutOfMemoryError, MemoryError):
                        raise
                    except Exception as e1:
                        events.append(self._fail(s, e1))
                if not parts:
                    logger.error("prefill failed for every newcomer: %r", e)
            for seqs, (cache, logits) in parts:
                self.cache.merge(cache)
                self.active.extend(seqs)
                for s in seqs:
                    s.weight_version = self.weight_version
                events += self._append(seqs, logits, first=True)
            self._retire()
        self.last_batch_size = len(self.active)
        if self.active:
            last = torch.tensor([[s.last_token] for s in self.active], device=self.device)  # (B, 1)
            logits = self.model(last, kv_cache=self.cache)[:, -1]  # (B, V): one forward, all rows
            events += self._append(self.active, logits)
            self._retire()
        self.steps += 1
        return events

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor):
        """Token choice for ``seqs``: (ids, model log-probs, sampler log-probs, tops) lists."""
        params = [s.params for s in seqs]
        if any(s.processors for s in seqs):
            logits = logits.float().clone()
            for i, s in enumerate(seqs):
                for proc in s.processors:
                    logits[i] = proc(list(s.output_ids), logits[i])
        needs_history = any(p.repetition_penalty != 1.0 for p in params)
        history = [s.prompt_ids + s.output_ids for s in seqs] if needs_history else None
        scores = process_logits(logits, params, history, outputs=[s.output_ids for s in seqs])
        ids = choose_tokens(scores, params, [s.generator for s in seqs])
        want = [p.logprobs for p in params if p.logprobs is not None]
        if not want:
            return ids.tolist(), None, None, None
        model_lp, sampler_lp, top = chosen_logprobs(logits, scores, ids, max(want))
        tops = None
        if top is not None:
            vals, idx = top[0].tolist(), top[1].tolist()
            tops = [list(zip(idx[i][: p.logprobs or 0], vals[i][: p.logprobs or 0])) for i, p in enumerate(params)]
        return ids.tolist(), model_lp.tolist(), sampler_lp.tolist(), tops

    def _append(self, seqs: list[Sequence], logits: torch.Tensor, first: bool = False) -> list[tuple[Sequence, Event]]:
        events = []
        try:
            chosen = [(s, *row) for s, *row in zip(seqs, *self._expand(self._choose(seqs, logits), len(seqs)))]
        except Exception:  # find the row(s) at fault: each alone; the others get their tokens
            chosen = []
            for i, s in enumerate(seqs):
                try:
                    chosen.append((s, *[c[0] for c in self._expand(self._choose([s], logits[i : i + 1]), 1)]))
                except Exception as e:
                    if not s.aborted:
                        events.append(self._fail(s, e))
        now = time.monotonic()
        for s, tok, lp, slp, top in chosen:
            if s.aborted:
                s.finish_reason = s.finish_reason or "abort"
                events.append((s, Event(finish_reason=s.finish_reason)))
                continue
            s.output_ids.append(tok)
            if s.params.logprobs is not None:
                s.logprobs.append(lp)
                s.sampler_logprobs.append(slp)
                s.top_logprobs.append(top or [])
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

    @staticmethod
    def _expand(choice, n: int):
        ids, lp, slp, tops = choice
        return ids, lp or [None] * n, slp or [None] * n, tops or [None] * n

    def _retire(self) -> None:
        keep = [i for i, s in enumerate(self.active) if s.finish_reason is None and not s.aborted]
        if len(keep) < len(self.active):
            self.cache.keep(keep)
            self.active = [self.active[i] for i in keep]

    def shutdown(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
