"""Engine metrics through Ray's metrics API: Prometheus on every node's metrics agent.

Names are prefixed ``llm_ray_serve_``; Ray exports them as ``ray_llm_ray_serve_*``. Tokens/s
is ``rate(ray_llm_ray_serve_generated_tokens_total[1m])`` in Prometheus, and a gauge with the
throughput of the last few seconds for dashboards without a rate query.
"""

from __future__ import annotations

import time

_LATENCY_BOUNDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]
_BATCH_BOUNDS = [1, 2, 4, 8, 16, 32, 64, 128]


class EngineMetrics:
    """What the engine reports: TTFT, request latency, tokens, tokens/s, queue depth, batch size."""

    def __init__(self, model: str, window_s: float = 5.0):
        from ray.util.metrics import Counter, Gauge, Histogram

        tags = {"model": model}
        keys = ("model",)
        self.ttft = Histogram("llm_ray_serve_time_to_first_token_s", "Time from arrival to the first token", _LATENCY_BOUNDS, keys)
        self.latency = Histogram("llm_ray_serve_request_latency_s", "Time from arrival to the last token", _LATENCY_BOUNDS, keys)
        self.batch = Histogram("llm_ray_serve_batch_size", "Sequences in each decode forward pass", _BATCH_BOUNDS, keys)
        self.tokens = Counter("llm_ray_serve_generated_tokens", "Tokens generated", keys)
        self.requests = Counter("llm_ray_serve_finished_requests", "Requests that finished generating", keys)
        self.rejected = Counter("llm_ray_serve_rejected_requests", "Requests answered 503 (queue full)", keys)
        self.queue_depth = Gauge("llm_ray_serve_queue_depth", "Requests waiting for a batch slot", keys)
        self.batch_now = Gauge("llm_ray_serve_running_sequences", "Sequences in the latest decode step", keys)
        self.tokens_per_s = Gauge("llm_ray_serve_tokens_per_s", "Generated tokens per second, recent window", keys)
        self.prefix_hit_rate = Gauge("llm_ray_serve_prefix_cache_hit_rate", "Share of prompt tokens found in the prefix cache", keys)
        self.prefix_hits = Counter("llm_ray_serve_prefix_cache_hit_tokens", "Prompt tokens whose KV came from the prefix cache", keys)
        self.prompt_tokens = Counter("llm_ray_serve_prompt_tokens", "Prompt tokens prefilled or found in the prefix cache", keys)
        for m in (self.ttft, self.latency, self.batch, self.tokens, self.requests, self.rejected, self.queue_depth, self.batch_now,
                  self.tokens_per_s, self.prefix_hit_rate, self.prefix_hits, self.prompt_tokens):
            m.set_default_tags(tags)
        self.window_s = window_s
        self._window_start = time.monotonic()
        self._window_tokens = 0

    def on_step(self, batch_size: int, queue_depth: int, new_tokens: int) -> None:
        self.queue_depth.set(queue_depth)
        self.batch_now.set(batch_size)
        if batch_size:
            self.batch.observe(batch_size)
        if new_tokens:
            self.tokens.inc(new_tokens)
            self._window_tokens += new_tokens
        now = time.monotonic()
        if now - self._window_start >= self.window_s:
            self.tokens_per_s.set(self._window_tokens / (now - self._window_start))
            self._window_start, self._window_tokens = now, 0

    def on_prefix_cache(self, hit_rate: float, hit_tokens: int, prompt_tokens: int) -> None:
        self.prefix_hit_rate.set(hit_rate)
        if hit_tokens:
            self.prefix_hits.inc(hit_tokens)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)

    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_finish(self, latency_s: float, n_tokens: int) -> None:
        self.latency.observe(latency_s)
        self.requests.inc()

    def on_rejected(self) -> None:
        self.rejected.inc()
