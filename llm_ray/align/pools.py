"""Ray actor pools for RL: launched here, used by the algorithm (``ppo.py``) through calls.

A ``RayActorGroup`` is N actors of one class, each with its own resources, reserved together in
one placement group (OpenRLHF's ``RayActorGroup``). Work is sharded over the actors by item
index, so a shard whose actor dies is re-run, whole, on its replacement: nothing is lost or
done twice. Every call has a timeout, and a timeout is an error naming the pool, never a hang.

Pools may be colocated (``colocated_pools``): one group of ``ColocatedActor``s hosts several
roles, each used through a ``PoolRole`` view that behaves as a group of its own.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Optional, Sequence

from llm_ray.config.align import PoolConfig

# on_replace(pool, index) readies a replacement actor (e.g. loads the latest weights); ``pool``
# is what the caller holds (a group, or a role of a colocated one)
OnReplace = Callable[[Any, int], None]

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
    """``pool.num_actors`` actors of ``actor_cls(*args)``; ``on_replace(self, index)`` readies a
    replacement (e.g. loads the latest policy weights) before it takes a dead actor's work."""

    def __init__(self, name: str, actor_cls, pool: PoolConfig, args: Sequence = (), timeout_s: float = 300.0,
                 max_restarts: int = 3, on_replace: Optional[OnReplace] = None):
        import ray
        from ray.util.placement_group import placement_group

        self.name, self.pool, self.args = name, pool, tuple(args)
        self.timeout_s, self.max_restarts, self.on_replace = timeout_s, max_restarts, on_replace
        self.restarts = 0
        self.closed = False
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
        self.rss_mb: list[float] = [0.0] * pool.num_actors  # each process's resident memory once ready
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
            infos = ray.get([self.actors[i].ready.remote() for i in indices], timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise PoolError(f"{self.name} pool: actors not ready after {self.timeout_s:.0f}s") from None
        for i, info in zip(indices, infos):
            self.pids[i], self.rss_mb[i] = info["pid"], info["rss_mb"]

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
            self.on_replace(self, index)

    def remote(self, index: int, method: str, *args, role: Optional[str] = None, **kwargs):
        """The ref of ``actor[index].method(*args)`` (of ``role``'s object when colocated)."""
        actor = self.actors[index]
        if role is not None:
            return actor.call.remote(role, method, *args, **kwargs)
        return getattr(actor, method).remote(*args, **kwargs)

    def map_shards(self, method: str, items: Sequence, *args, role: Optional[str] = None, **kwargs) -> list:
        """``actor.method(items[a:b], *args)`` per shard, results concatenated in item order.
        A shard whose actor dies is re-run on a replacement; a timeout is a ``PoolError``."""
        import ray

        bounds = shard_bounds(len(items), len(self.actors))
        pending = {i: b for i, b in enumerate(bounds)}
        results: dict[int, list] = {}
        started = time.perf_counter()
        while pending:
            refs = {i: self.remote(i, method, list(items[a:b]), *args, role=role, **kwargs) for i, (a, b) in pending.items()}
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

    def call_all(self, method: str, *args, role: Optional[str] = None, **kwargs) -> list:
        """``actor.method(*args)`` on every actor (e.g. a weight update), replacing dead ones."""
        import ray

        out = []
        for i in range(len(self.actors)):
            for _ in range(self.max_restarts + 1):
                try:
                    out.append(ray.get(self.remote(i, method, *args, role=role, **kwargs), timeout=self.timeout_s))
                    break
                except ray.exceptions.GetTimeoutError:
                    raise PoolError(f"{self.name} pool: {method} did not answer within {self.timeout_s:.0f}s") from None
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                    self.replace(i, e)  # a replacement was readied by on_replace: call it again
        return out

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.closed:  # a colocated group is shut down by each of its roles
            return
        self.closed = True
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            remove_placement_group(self.pg)


class PoolRole:
    """One role of a colocated group, used as a group of its own: same actors, pids, restarts
    (a dead process takes every role it hosts), its own busy time."""

    def __init__(self, group: RayActorGroup, role: str):
        self.group, self.role, self.name = group, role, role
        self.busy_s = 0.0

    actors = property(lambda self: self.group.actors)
    pids = property(lambda self: self.group.pids)
    rss_mb = property(lambda self: self.group.rss_mb)
    restarts = property(lambda self: self.group.restarts)

    def remote(self, index: int, method: str, *args, **kwargs):
        return self.group.remote(index, method, *args, role=self.role, **kwargs)

    def map_shards(self, method: str, items: Sequence, *args, **kwargs) -> list:
        started = time.perf_counter()
        out = self.group.map_shards(method, items, *args, role=self.role, **kwargs)
        self.busy_s += (time.perf_counter() - started) * len(shard_bounds(len(items), len(self.actors)))
        return out

    def call_all(self, method: str, *args, **kwargs) -> list:
        return self.group.call_all(method, *args, role=self.role, **kwargs)

    def shutdown(self) -> None:
        self.group.shutdown()


def colocated_pools(members: dict[str, tuple[type, tuple, PoolConfig, Optional[OnReplace]]], timeout_s: float = 300.0,
                    max_restarts: int = 3) -> dict[str, PoolRole]:
    """Roles ``{name: (actor class, args, pool config, on_replace)}`` hosted by one group of
    ``ColocatedActor``s (same num_actors; each reserves the members' summed resources)."""
    from llm_ray.align.rl_actors import ColocatedActor

    sizes = {p.num_actors for _, _, p, _ in members.values()}
    if len(sizes) != 1:
        raise ValueError(f"colocated pools need one num_actors, got {sizes}")
    pools = [p for _, _, p, _ in members.values()]
    summed = PoolConfig(num_actors=sizes.pop(), num_cpus=sum(p.num_cpus for p in pools), num_gpus=sum(p.num_gpus for p in pools))
    views: dict[str, PoolRole] = {}

    def on_replace(group, index: int) -> None:  # ready every role of the new process
        for role, (_, _, _, ready) in members.items():
            if ready is not None:
                ready(views[role], index)

    group = RayActorGroup("+".join(members), ColocatedActor, summed, ({r: (cls, args) for r, (cls, args, _, _) in members.items()},),
                          timeout_s=timeout_s, max_restarts=max_restarts, on_replace=on_replace)
    views.update({role: PoolRole(group, role) for role in members})
    return views
