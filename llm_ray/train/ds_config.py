"""Generate the DeepSpeed JSON from the recipe: the recipe is the one source of batch sizes.

Pure function of (recipe, whether a GPU is used), importable without torch, so the config a run
will use can be printed and tested without starting anything.
"""

from __future__ import annotations

from llm_ray.config import Recipe


def deepspeed_config(recipe: Recipe, on_gpu: bool, precision: str | None = None) -> dict:
    """``precision``: the resolved one when ``train.precision`` is ``auto`` (see device.py)."""
    t, p, o = recipe.train, recipe.parallel, recipe.optim
    precision = precision or t.precision
    if precision == "auto":
        precision = "bf16" if on_gpu else "fp32"  # what resolve_precision picks without a measurement
    zero: dict = {"stage": p.zero_stage}
    if p.zero_stage >= 1:
        zero.update(overlap_comm=on_gpu, contiguous_gradients=True)
    if p.offload in ("optimizer", "params"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if p.offload == "params":
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}

    config: dict = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": recipe.grad_accum_steps,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": [o.beta1, o.beta2],
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                # FusedAdam is CUDA-only; on CPU without offload use torch's AdamW. With offload
                # DeepSpeed picks its CPU Adam kernel itself.
                "torch_adam": not on_gpu and p.offload == "none",
                "adam_w_mode": True,
            },
        },
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": t.max_steps,
                # DeepSpeed refuses 0 warmup steps: no warmup = one step that starts at the full lr
                "warmup_num_steps": max(1, o.warmup_steps),
                "warmup_min_ratio": 0.0 if o.warmup_steps else 1.0,
                "cos_min_ratio": o.min_lr_ratio,
                "warmup_type": "linear",
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16, "loss_scale_window": 500},
        # Our own progress bar, TensorBoard and metrics replace DeepSpeed's console prints.
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    return config
