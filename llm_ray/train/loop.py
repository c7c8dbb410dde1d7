"""The function every Ray Train worker runs: build the engine, restore, train, checkpoint.

It exists once for every stage: what is trained and how its loss is computed come in the
trainer's config as a ``ModelSpec`` (``models/converters.py``) and an objective
(``train/objective.py``); nothing here knows which one.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Iterator, Optional
import numpy as np
import torch
import torch.distributed as dist

from llm_ray.config import Recipe, from_dict
from llm_ray.data.source import TrainingSource
from llm_ray.storage import resolve_storage, sse_of
from llm_ray.train.checkpointing import TrainState, restore_checkpoint, save_checkpoint
from llm_ray.train.device import detect_device, measure_matmul_tflops, resolve_precision

FAILURE_MARKER = "injected_failure_done"


def _to_device(batch: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Every field but the sample ids (bookkeeping, never a model input) as a tensor on ``device``."""
    return {k: torch.from_numpy(v).to(device, non_blocking=True) for k, v in batch.items() if k != "sample_ids"}


class TrainStep:
    """One optimizer step over ``grad_accum`` micro batches with the objective's loss; returns
    the loss and the objective's metrics, each averaged over micro batches and DP ranks."""

    def __init__(self, engine, batches: Iterator[dict], recipe: Recipe, device, objective, frozen: dict):
        self.engine, self.batches, self.device = engine, batches, device
        self.objective, self.frozen = objective, frozen
        self.accum = recipe.grad_accum_steps
        self.pipeline = recipe.parallel.pipeline_stages > 1

    def _pull(self) -> tuple[list[dict[str, torch.Tensor]], list[np.ndarray], float]:
        """The step's micro batches, their sample ids, and seconds spent waiting for them."""
        t0 = time.perf_counter()
        raw = [next(self.batches) for _ in range(self.accum)]
        wait = time.perf_counter() - t0
        self.objective.check_batch(raw[0])
        return [_to_device(b, self.device) for b in raw], [b["sample_ids"] for b in raw], wait

    def __call__(self) -> tuple[float, dict[str, float], list[np.ndarray], float]:
        """Returns (loss, metrics, sample ids per micro batch, seconds spent waiting for data)."""
        batches, ids, wait = self._pull()
        if self.pipeline:
            # PipelineEngine pulls `accum` micro batches itself (1F1B) and averages the loss over
            # micro batches and data-parallel ranks on the last stage, then broadcasts it.
            inputs = iter([self.objective.pipeline_inputs(b) for b in batches])
            return float(self.engine.train_batch(data_iter=inputs)), {}, ids, wait
        total, sums = torch.zeros((), device=self.device), {}
        for batch in batches:
            loss, metrics = self.objective.loss(self.engine, batch, self.frozen)
            # DeepSpeed divides by the accumulation steps itself (scale_wrt_gas).
            self.engine.backward(loss + self.engine.module.aux_loss())
            self.engine.step()
            total += loss.detach()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
        names = sorted(sums)  # same objective on every rank: same names, one all_reduce
        packed = torch.stack([total.float(), *(sums[k].to(self.device) for k in names)]) / self.accum
        dist.all_reduce(packed)
        packed = (packed / dist.get_world_size()).tolist()
        return packed[0], dict(zip(names, packed[1:])), ids, wait


def _global_sample_ids(ids: list[np.ndarray], dp_rank: int) -> Optional[list[int]]:
    """On rank 0: the step's sample ids in global-position order (micro step, then DP rank)."""
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (dp_rank, [a.tolist() for a in ids]))
    if dist.get_rank() != 0:
        return None
    per_rank = dict(gathered)  # pipeline stages of one DP rank saw the same samples
    return [i for m in range(len(ids)) for r in sorted(per_rank) for i in per_rank[r][m]]


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    return float(norm.item() if torch.is_tensor(norm) else norm)


def _agree_on_precision(requested: str, device: torch.device) -> tuple[str, float]:
    """Resolve ``auto`` on every rank; bf16 only if every rank found it faster (one engine,
    one precision). Returns (precision, this rank's matmul TFLOP/s in it)."""
    dist.barrier()  # every rank measures at once, sharing the host as they will when training
    precision, tflops = resolve_precision(requested, device)
    if requested != "auto":
        return precision, tflops
    vote = torch.tensor([0 if precision == "fp32" else 1], dtype=torch.int32, device=device)  # nccl: on GPU
    dist.all_reduce(vote, op=dist.ReduceOp.MIN)
    if vote.item() == 0 and precision != "fp32":
        return "fp32", measure_matmul_tflops(device, torch.float32)
    return precision, tflops


def _build_frozen(objective, device: torch.device, precision: str) -> dict[str, torch.nn.Module]:
    """The objective's frozen models on this worker: eval mode, no gradients, the run's dtype."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    return {name: spec.build().to(device=device, dtype=dtype).eval().requires_grad_(False)
            for name, spec in objective.frozen_models().items()}


def _stdout_to_stderr() -> None:
    """A stage command's last line of standard output is its output folder, and Ray forwards a
    worker's standard output to the driver's: worker chatter (DeepSpeed's logger writes to
    stdout) could land after that line. Everything this process writes goes to stderr instead."""
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())


def train_worker(config: dict) -> None:
    """Entry point of each Ray Train worker; ``config`` comes from ``launcher.build_trainer``."""
    import ray
    import ray.train

    _stdout_to_stderr()

    recipe = from_dict(Recipe, config["recipe"])
    spec, objective = config["model_spec"], config["objective"]
    model_cfg = spec.cfg
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    dev = detect_device(recipe.parallel.cpus_per_worker)
    import deepspeed  # after detect_device set DS_ACCELERATOR

    deepspeed.init_distributed(dist_backend=dev.backend)
    t = recipe.train
    precision, measured = _agree_on_precision(t.precision, dev.device)
    if precision == "fp16" and not deepspeed.get_accelerator().is_fp16_supported():
        raise RuntimeError(f"train.precision: fp16 is not supported on {dev.device.type} here; use bf16 or fp32")

    from llm_ray.models import flops_per_token
    from llm_ray.train.parallelize import build_engine

    source: TrainingSource = ray.get(config["source"])
    run = resolve_storage(recipe.run.storage_path, recipe.run.s3_endpoint, sse_of(recipe.run)).child(recipe.run.name)
    engine = build_engine(recipe, spec, objective, dev.is_gpu, precision)
    frozen = _build_frozen(objective, dev.device, precision)
    if recipe.parallel.pipeline_stages > 1:
        dp_rank, dp_size = engine.grid.get_data_parallel_rank(), engine.grid.get_data_parallel_world_size()
    else:
        dp_rank, dp_size = rank, ctx.get_world_size()

    expect = {"model": spec.model, "tokenizer_hash": config["tokenizer_hash"]}
    checkpoint = ray.train.get_checkpoint()
    state = restore_checkpoint(engine, checkpoint, rank, expect) if checkpoint else TrainState()

    # MFU's denominator: a matmul in the run's precision, measured at start on this worker.
    peak = torch.tensor(t.peak_tflops or measured, dtype=torch.float64, device=dev.device)
    dist.all_reduce(peak)  # cluster peak = sum over workers, each measured with its own threads
    tokens_per_step = t.global_batch_size * recipe.data.seq_len * objective.sequences_per_sample
    # a frozen model's forward costs 2N per token against the trained model's 6N (fwd + bwd)
    flops_per_tok = flops_per_token(model_cfg, recipe.data.seq_len) * (1 + objective.frozen_forwards / 3)

    def mfu(tokens_per_s: float) -> float:
        return tokens_per_s * flops_per_tok / (float(peak) * 1e12)

    logger = None
    if rank == 0:
        from llm_ray.train.metrics import MetricsLogger

        logger = MetricsLogger(run, state.step, t.max_steps, recipe.run.progress_bar, t.log_every, objective.name)
    batches = source.iterate(
        state.samples, dp_rank, dp_size, t.micro_batch_size, recipe.grad_accum_steps,
        steps=(recipe.run.stop_at_step or t.max_steps) - state.step,
    )
    objective.on_train_start(engine, state.step)
    step_fn = TrainStep(engine, batches, recipe, dev.device, objective, frozen)
    manifest = {**expect, "recipe_hash": config["recipe_hash"], "world_size": ctx.get_world_size(), "objective": objective.name}
    timed_steps, timed_seconds, last = 0, 0.0, {}
    while state.step < t.max_steps:
        step = state.step + 1
        if recipe.run.fail_at_step == step and rank == 0 and not run.exists(FAILURE_MARKER):
            run.write_text(FAILURE_MARKER, f"crashed at step {step}\n")
            os._exit(1)  # a hard crash, like a node loss or OOM kill: FailureConfig restarts us
        start = time.perf_counter()
        loss, objective_metrics, ids, data_wait = step_fn()
        sample_ids = _global_sample_ids(ids, dp_rank) if recipe.run.log_sample_ids else None
        if dev.is_gpu:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        state.step, state.samples = step, state.samples + t.global_batch_size
        objective.after_step(engine, step)
        if state.initial_loss is None:
            state.initial_loss = loss
        if step > 1 or t.max_steps == 1:  # the first step pays one-off set-up costs
            timed_steps, timed_seconds = timed_steps + 1, timed_seconds + seconds
        tokens_per_s = tokens_per_step / seconds
        last = {
            "step": step,
            "loss": loss,
            **objective_metrics,
            "lr": float(engine.get_lr()[0]),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s),
            "data_wait_s": data_wait,
            "step_s": seconds,
        }
        if sample_ids is not None:
            last["sample_ids"] = sample_ids
        grad_norm = _grad_norm(engine)
        if grad_norm is not None:
            last["grad_norm"] = grad_norm
        if logger:
            logger.log(step, last)
        due = step % recipe.checkpoint.every_steps == 0 or step == t.max_steps or step == recipe.run.stop_at_step
        if due:
            mean_tps = tokens_per_step * timed_steps / timed_seconds if timed_seconds else tokens_per_s
            metrics = {
                **{k: v for k, v in last.items() if k != "sample_ids"},
                "initial_loss": state.initial_loss,
                "final_loss": loss,
                "steps": step,
                "tokens_per_s": mean_tps,
                "mfu": mfu(mean_tps),
                "peak_tflops": float(peak),
                "precision": precision,
                "stopped_early": step < t.max_steps,
            }
            if logger:
                logger.sync()
            save_checkpoint(engine, state, manifest, metrics, rank, run, encrypt=recipe.checkpoint.encrypt)
        if step == recipe.run.stop_at_step:
            break
    if logger:
        logger.close()
