"""The client side of ``llm-ray bench serve``: streamed requests over HTTP from one asyncio loop,
and the CPU each process of the run spent meanwhile.

The client is aiohttp on one event loop (vLLM's ``benchmark_serving`` does the same), not a
thread per client: on a host with few cores the bench's own client competes with the proxy and
the replica for CPU, and 32 threads each parsing SSE chunks cost several times what one loop
does. ``ProcessCPU`` measures what it still costs, so a figure says whose CPU time it was.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Optional

import aiohttp
import psutil


async def _stream_one(session: aiohttp.ClientSession, url: str, r, key: Optional[str]) -> dict:
    """One streamed completion; per-chunk arrival times (TTFT, ITL) and the usage chunk's count."""
    body = {
        "prompt": r.prompt,
        "max_tokens": r.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    ttft, tokens, last, itl = None, 0, None, []
    async with session.post(f"{url}/v1/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:  # one SSE line at a time
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if last is None:
                    ttft = now - t0
                else:
                    itl.append(now - last)  # per chunk: a chunk's token count is not in the stream
                last = now
    return {
        "latency": time.perf_counter() - t0,
        "ttft": ttft if ttft is not None else float("nan"),
        "tokens": tokens,
        "itl": itl,
        "chunks": len(itl) + (last is not None),
    }


async def _drive(url: str, requests: list, clients: int, key: Optional[str]) -> tuple[list[dict], float]:
    slots = asyncio.Semaphore(clients)  # at most ``clients`` in flight: vLLM's --max-concurrency
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:

        async def limited(r) -> dict:
            async with slots:
                return await _stream_one(session, url, r, key)

        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(r) for r in requests))
        return list(results), time.perf_counter() - t0


def stream_requests(url: str, requests: list, clients: int, key: Optional[str] = None) -> tuple[list[dict], float]:
    """Send ``requests`` (``BenchRequest``s), at most ``clients`` at a time; (per-request
    results, wall seconds)."""
    return asyncio.run(_drive(url, requests, clients, key))


# Ray sets each worker's process title to ``ray::<ActorClass>...``; the rest are Ray's daemons.
_ROLES = (
    ("ServeReplica", "replica"),
    ("ProxyActor", "proxy"),
    ("ServeController", "controller"),
)


def _role(proc: psutil.Process, me: int) -> Optional[str]:
    if proc.pid == me:
        return "client"
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.Error, OSError):
        return None
    for marker, role in _ROLES:
        if marker in cmd:
            return role
    if "ray" in cmd and ("gcs_server" in cmd or "raylet" in cmd or "ray::" in cmd or "/ray/" in cmd):
        return "ray_other"
    return None


class ProcessCPU:
    """CPU seconds (user + system) spent by the bench client, the Serve replica(s), the proxy,
    the controller and Ray's other processes between ``start()`` and ``stop()``; ``stop``
    returns cores used per role (CPU seconds over wall seconds) and the host's total."""

    def start(self) -> None:
        self._t0, self._before = time.perf_counter(), self._snapshot()
        self._host0 = psutil.cpu_times()

    @staticmethod
    def _snapshot() -> dict[int, tuple[str, float]]:
        me, out = os.getpid(), {}
        for proc in psutil.process_iter():
            role = _role(proc, me)
            if role is None:
                continue
            try:
                t = proc.cpu_times()
            except (psutil.Error, OSError):
                continue
            out[proc.pid] = (role, t.user + t.system)
        return out

    def stop(self) -> dict[str, float]:
        after, wall = self._snapshot(), time.perf_counter() - self._t0
        host1 = psutil.cpu_times()
        cores: dict[str, float] = {}
        for pid, (role, seconds) in after.items():
            spent = seconds - self._before.get(pid, (role, 0.0))[1]
            cores[role] = cores.get(role, 0.0) + spent / wall
        busy = sum(getattr(host1, f) - getattr(self._host0, f) for f in ("user", "system", "nice", "irq", "softirq"))
        return {**{k: round(v, 3) for k, v in sorted(cores.items())}, "host_busy": round(busy / wall, 3), "host_cores": psutil.cpu_count()}
