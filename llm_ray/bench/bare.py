"""The baseline of ``bench train``: the recipe's model trained by a plain single-process loop.

No Ray, no DeepSpeed, no torch.distributed: what is left is the work every trainer must do
(forward, backward, gradient accumulation, clipping, AdamW), so the engine's tokens/s over
this loop's is the engine's efficiency on the same model, batch and precision.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from llm_ray.config import ModelConfig, Recipe
from llm_ray.data.source import TrainingSource
from llm_ray.models import build_model
from llm_ray.models.losses import token_cross_entropy as lm_loss  # the engine's causal LM loss


def _param_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings, never norm gains: the engine's ``param_groups`` rule."""
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def lr_ratio(recipe: Recipe, step: int) -> float:
    """The engine's learning-rate factor for optimizer step ``step`` (1-based).

    DeepSpeed's WarmupCosineLR with linear warm-up, as ``ds_config.py`` sets it up. DeepSpeed
    starts at iteration -1 (lr 0) and advances after each step, so step k runs iteration k - 2.
    Matching it makes the two sides' losses comparable: equal losses mean equal work.
    """
    o, it = recipe.optim, step - 2
    warmup = max(2, o.warmup_steps)  # DeepSpeed's own floor
    if it < 0:
        return 0.0
    if it < warmup:
        return it / warmup
    progress = min(1.0, (it - warmup + 1) / max(1, recipe.train.max_steps - warmup))
    return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * (1 + math.cos(math.pi * progress)) / 2


class BareTrainer:
    """One optimizer step = ``accum`` micro batches, then clip and AdamW, as the engine does.

    fp32: the model's own parameters go to ``torch.optim.AdamW``, as DeepSpeed does with ZeRO-0
    and ``torch_adam``. bf16: the model is cast to bf16 and each micro batch's gradients add up
    in the bf16 ``.grad``; at the step they are copied to fp32 master weights, clipped and
    updated by AdamW there, and the master weights are copied back to bf16. That is DeepSpeed's
    path for bf16 with ZeRO-0 (its unfused FP16 optimizer with a bf16 low-precision dtype).
    """

    def __init__(self, recipe: Recipe, model_cfg: ModelConfig, source: TrainingSource):
        if recipe.train.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision: the bare loop runs fp32 or bf16, not {recipe.train.precision}")
        self.recipe, self.source = recipe, source
        self.steps_done = 0
        self.micro, self.accum = recipe.train.micro_batch_size, recipe.grad_accum_steps
        self.grad_clip = recipe.optim.grad_clip
        torch.manual_seed(recipe.train.seed)  # the engine's initial weights
        self.model = build_model(model_cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.master = None
        if recipe.train.precision == "bf16":
            self.model.to(torch.bfloat16)
            self.master = [p.detach().float().clone().requires_grad_() for p in self.params]
        o = recipe.optim
        self.opt = torch.optim.AdamW(
            _param_groups(self.master or self.params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps
        )

    def step(self, start: int) -> float:
        """One optimizer step from global sample position ``start``; returns the mean loss."""
        total = 0.0
        for m in range(self.accum):
            batch = self.source.micro_batch(start, m, 0, 1, self.micro)
            inputs, labels = torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["labels"])
            loss = lm_loss(self.model(inputs), labels)
            ((loss + self.model.aux_loss()) / self.accum).backward()
            total += loss.item()
        trained = self.params
        if self.master is not None:
            for p, mp in zip(self.params, self.master):
                mp.grad, p.grad = p.grad.float(), None
            trained = self.master
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trained, self.grad_clip)
        self.steps_done += 1
        for group in self.opt.param_groups:
            group["lr"] = self.recipe.optim.lr * lr_ratio(self.recipe, self.steps_done)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.master is not None:
            with torch.no_grad():
                for p, mp in zip(self.params, self.master):
                    p.copy_(mp)
        return total / self.accum


def bare_train(recipe: Recipe, model_cfg: ModelConfig, source: TrainingSource, steps: int, threads: int) -> dict:
    """A warm-up step, then ``steps`` timed steps; the timing rule of the engine's loop."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # what the Ray worker sets for itself (cpus_per_worker)
    try:
        trainer = BareTrainer(recipe, model_cfg, source)
        batch = recipe.train.global_batch_size
        trainer.step(0)  # warm-up: allocator, oneDNN kernel selection, optimizer state
        seconds = []
        for i in range(1, steps + 1):
            t0 = time.perf_counter()
            loss = trainer.step(i * batch)
            seconds.append(time.perf_counter() - t0)
    finally:
        torch.set_num_threads(previous)
    tokens_per_step = batch * recipe.data.seq_len
    return {
        "tokens_per_s": tokens_per_step * steps / sum(seconds),
        "step_s": float(np.mean(seconds)),
        "step_s_median": float(np.median(seconds)),
        "final_loss": loss,
    }
