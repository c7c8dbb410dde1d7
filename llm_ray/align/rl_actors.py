"""The actors of ``llm-ray ppo``'s pools, and the hub between the controller and the trainer.

- ``RolloutActor``: our continuous-batching serving engine (``serve/engine.py``), not a second
  decode loop: samples with per-token log-probs and the weight version that produced them;
  takes versioned, bucketed, checksummed weight updates.
- ``ReferenceActor``: the frozen starting policy's per-token log-probs (the KL leash).
- ``RewardActor``: a rule function, a reward-model folder, or an HTTP endpoint.
- ``ColocatedActor``: several of those in one process (colocated pools).
- ``ExperienceHubActor``: experience by iteration (controller -> trainer) and the latest
  published weights (trainer -> controller -> rollout pool).
Launched by ``pools.RayActorGroup``; they know nothing of the algorithm.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import math
import os
import time
import urllib.request

import numpy as np


def actor_info() -> dict:
    """What a pool records of a ready actor: its process and resident memory (model loaded)."""
    import psutil

    return {"pid": os.getpid(), "rss_mb": psutil.Process().memory_info().rss / 2**20}


def weights_checksum(buckets: list[dict]) -> str:
    """blake2b over every tensor's name, shape, dtype and bytes, in bucket order."""
    import torch

    h = hashlib.blake2b(digest_size=16)
    for bucket in buckets:
        for name, t in bucket.items():
            h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())  # bf16 has no numpy dtype
    return h.hexdigest()


def checked_tensors(buckets: list[dict], checksum: str, what: str) -> dict:
    """The buckets' tensors by name, once their checksum matches the sender's."""
    got = weights_checksum(buckets)
    if got != checksum:
        raise ValueError(f"{what}: checksum {got} != {checksum} (a bucket was corrupted or lost)")
    return {name: t for bucket in buckets for name, t in bucket.items()}


class RolloutActor:
    def __init__(self, model_dir: str, max_batch_size: int, dtype: str = "fp32"):
        import torch

        from llm_ray.bundle import load_bundle
        from llm_ray.serve.engine import ContinuousBatchingEngine, torch_executor
        from llm_ray.train.device import DTYPES, local_device

        def setup():  # all torch work of the actor on the engine's one thread (engine.py says why)
            device = local_device()
            return load_bundle(model_dir, device=device, dtype=DTYPES[dtype] if dtype != "auto" else torch.float32)

        self.executor = torch_executor()
        self.bundle = self.executor.submit(setup).result()
        self.engine = ContinuousBatchingEngine(self.bundle.model, eos_ids=self.bundle.eos_ids,
                                               max_seq_len=self.bundle.cfg.max_seq_len, max_batch_size=max_batch_size,
                                               max_queue=1 << 20, executor=self.executor)

    def ready(self) -> dict:
        return actor_info()

    async def generate(self, requests: list[tuple[list[int], list[int]]], max_new_tokens: int, temperature: float) -> list[list[dict]]:
        """For each (prompt ids, one seed per sample): that many samples, each a dict of token
        ids, sampler log-probs (the tempered distribution they were drawn from), finish reason
        and weight version. All prompts are in the engine at once (continuous batching)."""
        from llm_ray.generation.config import SamplingParams

        async def one(prompt: list[int], seeds: list[int]) -> list[dict]:
            params = [SamplingParams(max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, seed=s, logprobs=0)
                      for s in seeds]
            outs = await self.engine.generate(list(prompt), params)
            return [{"token_ids": o.token_ids, "logprobs": o.sampler_logprobs, "finish_reason": o.finish_reason,
                     "weight_version": o.weight_version} for o in outs]

        return list(await asyncio.gather(*(one(p, s) for p, s in requests)))

    async def update_weights(self, version: int, bucket_refs: list, checksum: str) -> float:
        """Fetch the buckets, check them, swap them in between two engine steps; returns seconds."""
        import ray

        started = time.perf_counter()
        buckets = list(await asyncio.gather(*bucket_refs)) if bucket_refs and isinstance(bucket_refs[0], ray.ObjectRef) else bucket_refs
        tensors = checked_tensors(buckets, checksum, f"policy weights {version}")
        await self.engine.update_weights(version, tensors, in_flight="rerun")
        return time.perf_counter() - started

    def weight_version(self) -> int:
        return self.engine.weight_version


class ReferenceActor:
    def __init__(self, model_dir: str, dtype: str = "fp32"):
        import torch

        from llm_ray.bundle import load_bundle
        from llm_ray.train.device import DTYPES, local_device

        self.device = local_device()
        self.model = load_bundle(model_dir, device=self.device, dtype=DTYPES.get(dtype, torch.float32)).model.eval()

    def ready(self) -> dict:
        return actor_info()

    def logprobs(self, rows: list[tuple[np.ndarray, np.ndarray]], temperature: float, batch_size: int = 16) -> list[np.ndarray]:
        """Per-token log-probs (T,) of each (input_ids (T,), labels (T,)) row under the frozen
        policy at the sampling temperature; 0 where labels are ignored."""
        import torch

        from llm_ray.models.losses import token_logprobs

        out = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                ids = torch.from_numpy(np.stack([r[0] for r in rows[i:i + batch_size]])).to(self.device)
                labels = torch.from_numpy(np.stack([r[1] for r in rows[i:i + batch_size]])).to(self.device)
                logp = token_logprobs(self.model(ids).float() / temperature, labels)
                out.extend(logp.cpu().numpy().astype(np.float32))
        return out


class CriticActor:
    """Values (T,) of rollout rows under the critic as of the last update (PPO's baseline)."""

    def __init__(self, spec):
        from llm_ray.train.device import local_device

        self.device = local_device()
        self.model = spec.build().to(self.device).eval()
        self.version = 0

    def ready(self) -> dict:
        return actor_info()

    def values(self, rows: list[tuple[np.ndarray, np.ndarray]], batch_size: int = 16) -> list[np.ndarray]:
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(rows), batch_size):
                ids = torch.from_numpy(np.stack([r[0] for r in rows[i:i + batch_size]])).to(self.device)
                mask = torch.from_numpy(np.stack([r[1] for r in rows[i:i + batch_size]]) != -100).to(self.device)
                out.extend((self.model(ids).float() * mask).cpu().numpy().astype(np.float32))
        return out

    def update_weights(self, version: int, bucket_refs: list, checksum: str) -> float:
        import ray
        import torch

        started = time.perf_counter()
        tensors = checked_tensors(ray.get(list(bucket_refs)), checksum, f"critic weights {version}")
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                if name not in params or tuple(params[name].shape) != tuple(t.shape):
                    raise KeyError(f"critic weights {version}: {name} {tuple(t.shape)} does not fit the critic")
                params[name].copy_(t.to(params[name].device, params[name].dtype))
        self.version = int(version)
        return time.perf_counter() - started


def resolve_reward_function(spec: str):
    """``module:function`` -> the callable; a ValueError naming what is missing."""
    module_name, _, name = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"cannot import {module_name!r}: {e}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"{module_name} has no function {name!r}")
    return fn


def checked_rewards(values, n: int, source: str) -> list[float]:
    """Rewards as floats, one per completion, all finite: anything else is the source's error."""
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward {source}: {len(values)} rewards for {n} completions")
    out = []
    for i, v in enumerate(values):
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"reward {source}: reward {i} is {v!r}, not a number") from None
        if not math.isfinite(f):
            raise ValueError(f"reward {source}: reward {i} is {f}")
        out.append(f)
    return out


class RewardSource:
    """One source of rewards: a rule function, a reward-model folder, or an HTTP endpoint."""

    def __init__(self, source: dict, key: str, timeout_s: float = 60.0):
        from llm_ray.config import from_dict
        from llm_ray.config.align import RewardSourceConfig

        self.cfg = from_dict(RewardSourceConfig, source, key)
        self.timeout_s = timeout_s
        if self.cfg.kind == "function":
            self.fn = resolve_reward_function(self.cfg.function)
        elif self.cfg.kind == "model":
            from llm_ray.align.reward import RewardScorer

            self.fn = RewardScorer(self.cfg.model)
        self.name = getattr(self.cfg, self.cfg.kind)

    def __call__(self, items: list[tuple[list[dict], str, dict]]) -> list[float]:
        prompts, completions = [p for p, _, _ in items], [c for _, c, _ in items]
        if self.cfg.kind == "url":
            body = json.dumps({"prompts": prompts, "completions": completions}).encode()
            req = urllib.request.Request(self.cfg.url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                values = json.loads(resp.read())["rewards"]
        elif self.cfg.kind == "model":
            values = self.fn(prompts, completions)
        else:
            columns = sorted({k for _, _, c in items for k in c})
            values = self.fn(prompts, completions, **{k: [c.get(k) for _, _, c in items] for k in columns})
        return checked_rewards(values, len(items), self.name)


class RewardActor:
    """The reward source, and the held-out judge when one is given (same samples, never trained on)."""

    def __init__(self, source: dict, timeout_s: float = 60.0, judge: dict | None = None):
        self.sources = {"reward": RewardSource(source, "align.ppo.reward", timeout_s)}
        if judge:
            self.sources["judge"] = RewardSource(judge, "align.ppo.judge", timeout_s)

    def ready(self) -> dict:
        return actor_info()

    def score(self, items: list[tuple[list[dict], str, dict]], source: str = "reward") -> list[float]:
        """Rewards of (prompt messages, completion, the record's other fields) items."""
        return self.sources[source](items)


class ColocatedActor:
    """Several pools' actors in one process: ``roles`` = {role: (actor class, args)}. Their
    calls arrive through ``call``; all their torch work runs on one thread (the rollout
    engine's when it is here: engine.py says why one thread)."""

    def __init__(self, roles: dict):
        from llm_ray.serve.engine import torch_executor

        self.roles: dict = {}
        if "rollout" in roles:  # it makes the executor the others then share
            cls, args = roles["rollout"]
            self.roles["rollout"] = cls(*args)
        self.executor = self.roles["rollout"].executor if self.roles else torch_executor()
        for role, (cls, args) in roles.items():
            if role not in self.roles:
                self.roles[role] = self.executor.submit(cls, *args).result()

    def ready(self) -> dict:
        return actor_info()

    async def call(self, role: str, method: str, *args, **kwargs):
        import functools
        import inspect

        fn = getattr(self.roles[role], method)
        if inspect.iscoroutinefunction(fn):
            return await fn(*args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))


class ExperienceHubActor:
    """Async: the controller ``put``s each iteration's experience, trainer ranks ``get`` it; the
    trainer ``publish``es weights after each update, the controller ``wait_weights`` for them."""

    def __init__(self):
        self.experience: dict[int, dict] = {}
        self.weights: dict[str, tuple[int, list, str, float]] = {}  # channel -> version, bucket refs, checksum, seconds
        self.changed = asyncio.Condition()

    def ready(self) -> dict:
        return actor_info()

    async def put(self, iteration: int, arrays: dict) -> None:
        async with self.changed:
            self.experience[iteration] = arrays
            for old in [k for k in self.experience if k < iteration - 1]:  # a restarted trainer re-reads at most one back
                del self.experience[old]
            self.changed.notify_all()

    async def get(self, iteration: int, timeout_s: float) -> dict:
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: iteration in self.experience), timeout_s)
            return self.experience[iteration]

    async def publish(self, channel: str, version: int, bucket_refs: list, checksum: str, seconds: float) -> None:
        async with self.changed:
            self.weights[channel] = (version, bucket_refs, checksum, seconds)
            self.changed.notify_all()

    async def wait_weights(self, channel: str, version: int, timeout_s: float):
        """(version, bucket refs, checksum, the trainer's gather seconds) of ``channel`` once
        ``version`` is out."""
        async with self.changed:
            await asyncio.wait_for(self.changed.wait_for(lambda: channel in self.weights and self.weights[channel][0] >= version), timeout_s)
            return self.weights[channel]
