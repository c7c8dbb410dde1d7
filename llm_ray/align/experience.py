"""The trainer's side of RL: experience in as a training source, policy weights out.

``ExperienceSource`` is a ``TrainingSource`` (``data/source.py``): the engine's worker loop
trains on it like on any other data, each optimizer step one minibatch of one iteration's
rollouts, ``ppo_epochs`` passes over them in a seeded order. The data position the loop keeps in
its checkpoint is the step, so a resumed or restarted trainer asks the hub for the same
iteration and minibatch again.

``publish_weights`` sends the trained weights (policy or critic) to the hub after each iteration's last step (and at
start: a resumed run's rollout pool must sample from the resumed policy). Only what training
changes travels (LoRA: the merged target matrices; frozen tensors never), packed into buckets of
about ``bucket_mb`` so one message holds many tensors — OpenRLHF #533 measured weight sync at
over 40% of a step when rank 0 sent one parameter at a time. Under ZeRO-3 every rank joins the
gather of a bucket, all of its parameters at once.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Iterator

import numpy as np
import torch
import torch.distributed as dist


class ExperienceSource:
    num_samples = 1 << 62  # rollouts are made as training asks; there is no epoch end

    def __init__(self, hub, samples_per_iteration: int, ppo_epochs: int, minibatches: int, seed: int, timeout_s: float):
        self.hub, self.n, self.epochs, self.minibatches = hub, samples_per_iteration, ppo_epochs, minibatches
        self.seed, self.timeout_s = seed, timeout_s

    @property
    def steps_per_iteration(self) -> int:
        return self.epochs * self.minibatches

    def _fetch(self, iteration: int) -> dict[str, np.ndarray]:
        import ray

        try:
            return ray.get(self.hub.get.remote(iteration, self.timeout_s), timeout=self.timeout_s + 30)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayTaskError) as e:
            raise TimeoutError(f"trainer: no experience for iteration {iteration} from the controller within "
                               f"{self.timeout_s:.0f}s ({type(e).__name__})") from None

    def order(self, iteration: int, epoch: int) -> np.ndarray:
        """The seeded order of an iteration's samples in one PPO epoch."""
        return np.random.default_rng([self.seed, iteration, epoch]).permutation(self.n)

    def iterate(self, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int) -> Iterator[dict]:
        global_batch = micro * dp_size * accum
        if global_batch * self.minibatches != self.n:
            raise ValueError(f"a minibatch of {global_batch} x {self.minibatches} != {self.n} samples per iteration")
        first = start // global_batch
        cached, arrays = None, {}
        for step in range(first, first + steps):
            iteration, within = divmod(step, self.steps_per_iteration)
            epoch, minibatch = divmod(within, self.minibatches)
            if iteration != cached:
                arrays, cached = self._fetch(iteration), iteration
            rows = self.order(iteration, epoch)[minibatch * global_batch:(minibatch + 1) * global_batch]
            for m in range(accum):
                ids = rows[(m * dp_size + dp_rank) * micro:(m * dp_size + dp_rank + 1) * micro]
                fresh = np.full(len(ids), float(within == 0), np.float32)  # weights = the rollout's
                yield {**{k: v[ids] for k, v in arrays.items()}, "fresh": fresh, "sample_ids": step * self.n + ids}


def _changing_tensors(module: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter], callable]]:
    """(name in the plain model, the parameters it is made of, how to make it) for every tensor
    training can change: a trainable parameter, or a LoRA target's merged weight."""
    from llm_ray.models.lora import LoRALinear

    out, covered = [], set()
    for path, m in module.named_modules():
        if isinstance(m, LoRALinear):
            parts = [m.base.weight, *(p for p in m.parameters() if p is not m.base.weight and p.requires_grad)]
            covered.update(id(p) for p in m.parameters())
            out.append((f"{path}.weight" if path else "weight", parts,
                        lambda m=m: m.base.weight + m.delta_weight().to(m.base.weight.dtype)))
    for name, p in module.named_parameters():
        if p.requires_grad and id(p) not in covered:
            out.append((name, [p], lambda p=p: p))
    return out


def policy_buckets(engine, bucket_mb: float) -> list[dict[str, torch.Tensor]]:
    """The changing tensors of the engine's module as CPU buckets (on rank 0; [] elsewhere)."""
    zero3 = engine.zero_optimization_stage() == 3
    if zero3:
        from deepspeed.runtime.zero import GatheredParameters
    entries = _changing_tensors(engine.module)
    limit = bucket_mb * 2**20

    def size(params) -> int:
        return sum((p.ds_numel if zero3 else p.numel()) * p.element_size() for p in params)

    groups, current, current_bytes = [], [], 0
    for entry in entries:  # the same grouping on every rank: same module, same order
        b = size(entry[1])
        if current and current_bytes + b > limit:
            groups.append(current)
            current, current_bytes = [], 0
        current.append(entry)
        current_bytes += b
    if current:
        groups.append(current)
    rank, out = dist.get_rank(), []
    for group in groups:
        params = list({id(p): p for _, ps, _ in group for p in ps}.values())
        with GatheredParameters(params, modifier_rank=None) if zero3 else nullcontext():
            if rank == 0:
                with torch.no_grad():
                    out.append({name: make().detach().to("cpu", copy=True) for name, _, make in group})
    return out


def publish_weights(engine, hub, channel: str, version: int, bucket_mb: float, timeout_s: float) -> None:
    """Gather, put in the object store, and publish ``version`` of ``channel`` (policy,
    critic) to the hub (rank 0 sends)."""
    import ray

    from llm_ray.align.rl_actors import weights_checksum

    started = time.perf_counter()
    buckets = policy_buckets(engine, bucket_mb)
    if dist.get_rank() == 0:
        refs = [ray.put(b) for b in buckets]
        checksum = weights_checksum(buckets)
        try:
            ray.get(hub.publish.remote(channel, version, refs, checksum, time.perf_counter() - started), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise TimeoutError(f"{channel} trainer: publishing weights {version} to the hub took over {timeout_s:.0f}s") from None
    dist.barrier()
