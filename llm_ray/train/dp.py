"""DP-SGD on the engine: per-example gradient clipping and Gaussian noise, expressed in the loss.

The engine's backward, accumulation and data-parallel all-reduce stay DeepSpeed's. What
changes is the loss each rank back-propagates for a micro batch of b examples:

    L = (1/b) <Σ_i w_i ∇ℓ_i, θ>  +  [rank 0] (1/b) <n, θ>,   w_i = min(1, C / ‖∇ℓ_i‖)

with the clipped sum and the noise as constants (the value of L is set to the mean loss). Its
gradient is (1/b)(Σ_i clip_C(∇ℓ_i) + n). DeepSpeed averages it over accumulation steps and
ranks, so the step's gradient is (1/B)(Σ_{i ∈ global batch} clip_C(∇ℓ_i) + Σ_m n_m): with
n_m ~ N(0, σ²C²/accum) on rank 0 only, Σ_m n_m ~ N(0, σ²C²), noise added once per step, as
DP-SGD (Abadi et al. 2016) prescribes, whatever the world size. The per-example gradients come from
``torch.func`` (vmap of grad over the batch: one functional forward and backward of the model,
which yields the losses too), so the step needs no second pass through the model; Opacus'
``GradSampleModule`` hooks do not compose with DeepSpeed's engine, and fastDP is not on our
stack. The noise is seeded by (seed, step, micro step): a resumed run draws the same noise.

Opacus' accountant (RDP or PRV) turns (σ, sample rate, steps, δ) into ε, reported each step.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llm_ray.train.objective import Objective


def per_example_grads(module: nn.Module, per_example_loss, batch: dict, chunk: int | None = None):
    """({name: (B, *shape)} each example's gradient over ``module``'s trainable parameters, (B,)
    each example's loss); ``per_example_loss(module, batch) -> (B,)``. One ``torch.func`` pass,
    no .grad touched."""
    from torch.func import functional_call, grad_and_value, vmap

    params = {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}
    frozen = {n: p.detach() for n, p in module.named_parameters() if not p.requires_grad}
    buffers = dict(module.named_buffers())

    def one(trainable, example):
        rows = {k: v.unsqueeze(0) for k, v in example.items()}  # a batch of one
        return per_example_loss(lambda *a, **k: functional_call(module, ({**trainable, **frozen}, buffers), a, k), rows)[0]

    return vmap(grad_and_value(one), in_dims=(None, 0), chunk_size=chunk)(params, batch)


def grad_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B,) the L2 norm of each example's gradient, over every parameter."""
    return sum(g.float().pow(2).flatten(1).sum(1) for g in grads.values()).sqrt()


def per_example_grad_norms(module: nn.Module, per_example_loss, batch: dict, chunk: int | None = None) -> torch.Tensor:
    """(B,) the L2 norm of each example's gradient over ``module``'s trainable parameters."""
    return grad_norms(per_example_grads(module, per_example_loss, batch, chunk)[0])


def gradient_term(params: list[nn.Parameter], grads: list[torch.Tensor]) -> torch.Tensor:
    """A scalar of value 0 whose gradient w.r.t. each parameter is the given constant:
    <g, θ - θ.detach()>. How a gradient computed outside the engine (the clipped sum, the noise)
    enters DeepSpeed's backward, and so its accumulation, ZeRO partitioning and all-reduce."""
    total = torch.zeros((), device=params[0].device)
    for p, g in zip(params, grads, strict=True):
        total = total + (g.detach().to(p.device, p.dtype) * (p - p.detach())).sum()
    return total


def clip_weights(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / ‖g_i‖): the factor that clips each example's gradient to at most C."""
    return (max_norm / (norms + 1e-6)).clamp(max=1.0)


def noise_term(params: list[nn.Parameter], std: float, generator: torch.Generator) -> torch.Tensor:
    """A scalar of value 0 whose gradient w.r.t. each parameter is fresh N(0, std²) noise (so the
    logged loss stays the loss)."""
    noise = [torch.randn(p.shape, generator=generator, dtype=torch.float32) * std for p in params]
    return gradient_term(params, noise)


def sample_rate(global_batch: int, examples: int) -> float:
    return min(1.0, global_batch / examples)


def noise_for_target(target_epsilon: float, delta: float, rate: float, steps: int, accountant: str) -> float:
    """The smallest σ whose ε after ``steps`` at ``rate`` is ``target_epsilon`` (Opacus' search)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta, sample_rate=rate, steps=steps,
                                      accountant=accountant))


@functools.lru_cache(maxsize=32)
def _one_step_rdp(noise_multiplier: float, rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp

    return tuple(rdp.compute_rdp(q=rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS))


def epsilon(noise_multiplier: float, rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε at δ after ``steps`` DP-SGD steps, from Opacus' accountant (its own computation)."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        # Opacus' RDP of n steps is n x the one-step RDP per order (its compute_rdp multiplies):
        # computing that curve once keeps ~50 ms of accounting out of every step
        from opacus.accountants.analysis import rdp

        curve = np.array(_one_step_rdp(noise_multiplier, rate)) * steps
        return float(rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)[0])
    acc = PRVAccountant()
    acc.history = [(noise_multiplier, rate, steps)]  # steps of one (σ, q): what acc.step() would record
    return float(acc.get_epsilon(delta))


@dataclass
class DPSGD(Objective):
    """Wraps an objective that has ``per_example_loss(model, batch) -> (B,)`` (causal LM, SFT)."""

    inner: Objective
    noise_multiplier: float
    max_grad_norm: float
    rate: float  # sample rate: global batch / examples
    delta: float
    accountant: str
    grad_accum: int
    seed: int
    step: int = field(default=0, init=False)
    micro: int = field(default=0, init=False)
    _eps: tuple | None = field(default=None, init=False, repr=False)

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def batch_fields(self) -> tuple[str, ...]:
        return self.inner.batch_fields

    def frozen_models(self):
        return self.inner.frozen_models()

    def on_train_start(self, engine, step: int) -> None:
        self.step, self.micro = step, 0
        self.inner.on_train_start(engine, step)

    def after_step(self, engine, step: int) -> None:
        self.step, self.micro = step, 0
        self.inner.after_step(engine, step)

    def loss(self, engine, batch, frozen):
        import torch.distributed as dist

        module = engine.module if hasattr(engine, "module") else engine
        fields = {k: batch[k] for k in (*self.batch_fields, "segment_ids") if k in batch}
        grads, losses = per_example_grads(module, self.inner.per_example_loss, fields)  # {name: (B, ...)}, (B,)
        norms = grad_norms(grads)
        weights = clip_weights(norms, self.max_grad_norm)  # (B,)
        b = losses.shape[0]
        clipped = {n: torch.einsum("b,b...->...", weights.to(g.dtype), g) / b for n, g in grads.items()}
        trainable = [p for n, p in module.named_parameters() if p.requires_grad]
        loss = losses.mean().detach() + gradient_term(trainable, list(clipped.values()))  # value: the loss
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 1_009 + self.micro)
            std = self.noise_multiplier * self.max_grad_norm / math.sqrt(self.grad_accum)
            loss = loss + noise_term(trainable, std, g) / b
        self.micro += 1
        return loss, {"clipped_share": (norms > self.max_grad_norm).float().mean(), "grad_norm_median": norms.median(),
                      "epsilon": torch.tensor(self.epsilon_at(self.step + 1)), "noise_multiplier": torch.tensor(self.noise_multiplier),
                      "dp_sample_rate": torch.tensor(self.rate)}

    def privacy_summary(self, steps: int) -> dict:
        return {"epsilon": self.epsilon_at(steps), "delta": self.delta, "accountant": self.accountant, "steps": steps,
                "noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm, "sample_rate": self.rate,
                "sampling": "shuffled fixed-size batches (epsilon at q = batch / examples, as for Poisson)"}

    def epsilon_at(self, step: int) -> float:
        """ε at δ once ``step`` steps are done (cached: every micro batch of a step asks)."""
        if self._eps is None or self._eps[0] != step:
            self._eps = (step, epsilon(self.noise_multiplier, self.rate, step, self.delta, self.accountant))
        return self._eps[1]


def private(objective: Objective, recipe, source) -> Objective:
    """``objective`` wrapped in DP-SGD when ``privacy.dp.enabled`` (σ from the target ε if one is
    given), else as it is. RecipeError naming the key for an objective without per-example losses."""
    from llm_ray.config import RecipeError

    dp = recipe.privacy.dp
    if not dp.enabled:
        return objective
    if not hasattr(objective, "per_example_loss"):
        raise RecipeError("privacy.dp.enabled", f"objective {objective.name} has no per-example loss to clip (causal LM and SFT have)")
    if not hasattr(source, "num_samples"):
        raise RecipeError("privacy.dp.enabled", "needs a training set of known size (the sample rate of the accountant)")
    rate = sample_rate(recipe.train.global_batch_size, source.num_samples)
    sigma = dp.noise_multiplier or noise_for_target(dp.target_epsilon, dp.delta, rate, recipe.train.max_steps, dp.accountant)
    return DPSGD(objective, sigma, dp.max_grad_norm, rate, dp.delta, dp.accountant, recipe.grad_accum_steps, recipe.train.seed)
