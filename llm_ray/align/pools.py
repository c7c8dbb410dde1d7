"""Ray actor pools for RL: launched here, used by the algorithm (``ppo.py``) through calls.

A ``RayActorGroup`` is N actors of one class, each with its own resources, reserved together in
one placement group (OpenRLHF's ``RayActorGroup``). Work is sharded over the actors by item
index, so a shard whose actor dies is re-run, whole, on its replacement: nothing is lost or
done twice. Every call has a timeout, and a timeout is an error naming the pool, never a hang.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

from llm_ray.config.align import PoolConfig

logger = logging.getLogger("llm_ray.rl")


class PoolError(RuntimeError):
    """A pool call failed for good (timeout, or its actors kept dying); names the pool."""


def shard_bounds(n_items: int, n_shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, sizes differing by at most one, empty shards dropped."""
    base, extra = divmod(n_items, n_shards)
    bounds, start = [], 0
    for i in range(n_shards):
        end = start + base + (i < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


class RayActorGroup:
    """``pool.num_actors`` actors of ``actor_cls(*args)``; ``on_replace(actor)`` readies a
    replacement (e.g. loads the latest policy weights) before it takes a dead actor's work."""

    def __init__(self, name: str, actor_cls, pool: PoolConfig, args: Sequence = (), timeout_s: float = 300.0,
                 max_restarts: int = 3, on_replace: Optional[Callable[[Any], None]] = None):
        import ray
        from ray.util.placement_group import placement_group

        self.name, self.pool, self.args = name, pool, tuple(args)
        self.timeout_s, self.max_restarts, self.on_replace = timeout_s, max_restarts, on_replace
        self.restarts = 0
        self.busy_s = 0.0  # summed over actors: seconds with work (the pool's idle share)
        self._remote = ray.remote(actor_cls)
        bundle = {k: v for k, v in (("CPU", pool.num_cpus), ("GPU", pool.num_gpus)) if v > 0}
        self.pg = None
        if bundle:  # Ray refuses empty bundles; a zero-resource pool needs no reservation
            self.pg = placement_group([dict(bundle) for _ in range(pool.num_actors)], strategy="PACK", name=f"llm-ray-{name}")
            try:
                ray.get(self.pg.ready(), timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise PoolError(f"{name} pool: {pool.num_actors} x {bundle} could not be reserved in {timeout_s:.0f}s "
                                f"(cluster has {ray.cluster_resources()})") from None
        self.actors = [self._spawn(i) for i in range(pool.num_actors)]
        self.pids: list[int] = [0] * pool.num_actors  # each actor's process (logs, fault drills)
        self._wait_ready(list(range(pool.num_actors)))

    def _spawn(self, index: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        options: dict = {"num_cpus": self.pool.num_cpus, "num_gpus": self.pool.num_gpus}
        if self.pg is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=index)
        return self._remote.options(**options).remote(*self.args)

    def _wait_ready(self, indices: list[int]) -> None:
        import ray

        try:
            pids = ray.get([self.actors[i].ready.remote() for i in indices], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PoolError(f"{self.name} pool: actors not ready after {self.timeout_s:.0f}s") from None
        for i, pid in zip(indices, pids):
            self.pids[i] = pid

    def replace(self, index: int, cause: BaseException) -> None:
        import ray

        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise PoolError(f"{self.name} pool: actor {index} died ({cause!r}) after {self.max_restarts} replacements") from cause
        logger.warning("%s pool: actor %d died (%s); replacing it (%d/%d)", self.name, index, type(cause).__name__,
                       self.restarts, self.max_restarts)
        try:
            ray.kill(self.actors[index], no_restart=True)
        except Exception:  # already gone
            pass
        self.actors[index] = self._spawn(index)
        self._wait_ready([index])
        if self.on_replace is not None:
            self.on_replace(self.actors[index])

    def map_shards(self, method: str, items: Sequence, *args, **kwargs) -> list:
        """``actor.method(items[a:b], *args)`` per shard, results concatenated in item order.
        A shard whose actor dies is re-run on a replacement; a timeout is a ``PoolError``."""
        import ray

        bounds = shard_bounds(len(items), len(self.actors))
        pending = {i: b for i, b in enumerate(bounds)}
        results: dict[int, list] = {}
        started = time.perf_counter()
        while pending:
            refs = {i: getattr(self.actors[i], method).remote(list(items[a:b]), *args, **kwargs) for i, (a, b) in pending.items()}
            for i, ref in refs.items():
                try:
                    results[i] = ray.get(ref, timeout=max(1.0, self.timeout_s - (time.perf_counter() - started)))
                    del pending[i]
                except ray.exceptions.GetTimeoutError:
                    raise PoolError(f"{self.name} pool: {method} did not answer within {self.timeout_s:.0f}s") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    self.replace(i, e)  # pending[i] stays: re-run on the replacement
        self.busy_s += (time.perf_counter() - started) * len(bounds)
        return [x for i in sorted(results) for x in results[i]]

    def call_all(self, method: str, *args, **kwargs) -> list:
        """``actor.method(*args)`` on every actor (e.g. a weight update), replacing dead ones."""
        import ray

        out = []
        for i in range(len(self.actors)):
            for _ in range(self.max_restarts + 1):
                try:
                    out.append(ray.get(getattr(self.actors[i], method).remote(*args, **kwargs), timeout=self.timeout_s))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise PoolError(f"{self.name} pool: {method} did not answer within {self.timeout_s:.0f}s") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    self.replace(i, e)  # a replacement was readied by on_replace: call it again
        return out

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)
