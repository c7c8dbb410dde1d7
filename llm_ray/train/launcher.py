"""Driver side of pretraining: prepare tokenizer and data, run a Ray Train ``TorchTrainer``,
write the run's ``summary.json``.

Rerunning with the same ``run.storage_path`` and ``run.name`` resumes: Ray Train V2 restores its
checkpoint manager from the run folder and hands the latest checkpoint to the workers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass

from llm_ray.config import Recipe, RecipeError
from llm_ray.stage import StageResult
from llm_ray.storage import Storage, resolve_storage, sse_of


def ensure_ray() -> None:
    """Connect to the cluster named by RAY_ADDRESS (as under ``ray job submit``) or start a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(log_to_driver=True)


def _use_gpu(recipe: Recipe) -> bool:
    import ray

    if recipe.parallel.use_gpu is not None:
        return recipe.parallel.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= 1


def _has_checkpoints(run: Storage) -> bool:
    return any(n.startswith("checkpoint_") for n in run.listdir())


def check_resumable(run: Storage, model: dict, tokenizer) -> None:
    """Refuse, before Ray starts, to resume a run written with another model or tokenizer."""
    from llm_ray.data.tokenizer import tokenizer_hash
    from llm_ray.train.checkpointing import MANIFEST, latest_complete_checkpoint, normalized_model

    tok_hash = tokenizer_hash(tokenizer)
    ckpt = latest_complete_checkpoint(run)
    if ckpt is None:
        return
    manifest = json.loads(ckpt.read_text(MANIFEST))
    if manifest["tokenizer_hash"] != tok_hash:
        raise RecipeError("data.tokenizer", f"run {run.uri} was trained with another tokenizer; use a new run.name")
    saved = normalized_model(manifest["model"])
    for key, value in model.items():
        if saved.get(key) != value:
            raise RecipeError(
                f"model.{key}", f"run {run.uri} has checkpoints with {key}={saved.get(key)!r}, "
                f"the recipe says {value!r}; use a new run.name to start over"
            )


def _check_same_tokenizer(run: Storage, saved, named, path: str) -> None:
    """Refuse to go on with ``run`` (its ``tokenizer.json`` is ``saved``) when the recipe names another."""
    from llm_ray.data.tokenizer import tokenizer_hash

    if tokenizer_hash(saved) != tokenizer_hash(named):
        raise RecipeError("data.tokenizer", f"{path} is not the tokenizer run {run.uri} was trained with "
                                            f"({tokenizer_hash(named)}, the run's is {tokenizer_hash(saved)}); "
                                            "use a new run.name")


def _prepared_dataset(recipe: Recipe) -> Storage:
    """The prepared dataset of ``data.shards``, checked against the recipe before training."""
    from llm_ray.data.shards import read_manifest

    dataset = resolve_storage(recipe.data.shards, recipe.run.s3_endpoint)
    manifest = read_manifest(dataset)
    if manifest is None:
        raise RecipeError("data.shards", f"no manifest.json under {dataset.uri}; run `llm-ray data prepare` first")
    if manifest["seq_len"] != recipe.data.seq_len:
        raise RecipeError("data.seq_len", f"{recipe.data.seq_len}, but {dataset.uri} was packed with seq_len {manifest['seq_len']}")
    if manifest["objective"] != recipe.train.objective:
        raise RecipeError("train.objective", f"{recipe.train.objective}, but {dataset.uri} was packed for {manifest['objective']}")
    return dataset


def prepare_source(recipe: Recipe, run: Storage):
    """Tokenizer (the run's own copy wins on resume) and the packed training source.

    Needs no Ray: ``pretrain`` calls it first, so that a bad input path or a changed tokenizer
    is one line from the CLI before anything starts.
    """
    from tokenizers import Tokenizer

    from llm_ray.data.packing import MaskingSpec
    from llm_ray.data.source import TokenBlockSource, text_blocks
    from llm_ray.data.tokenizer import ensure_tokenizer, special_ids

    data = recipe.data
    dataset = None
    if data.source == "shards":
        dataset = _prepared_dataset(recipe)
        tokenizer = Tokenizer.from_str(dataset.read_text("tokenizer.json"))  # the one the shards were packed with
    elif run.exists("tokenizer.json"):
        tokenizer = Tokenizer.from_str(run.read_text("tokenizer.json"))
        if data.tokenizer.path and os.path.exists(data.tokenizer.path):  # missing (train_if_missing): the run's copy stays
            _check_same_tokenizer(run, tokenizer, ensure_tokenizer(data.tokenizer, data.paths), data.tokenizer.path)
    else:
        tokenizer = ensure_tokenizer(data.tokenizer, data.paths)
    special = special_ids(tokenizer)
    vocab = tokenizer.get_vocab_size()
    masking = None
    if recipe.train.objective == "masked_lm":
        if special.mask_id is None:
            raise RecipeError("data.tokenizer", "masked_lm needs a tokenizer with a [MASK] token (kind: wordpiece)")
        masking = MaskingSpec(
            mask_id=special.mask_id,
            vocab_size=vocab,
            probability=recipe.train.mlm_probability,
            special_ids=tuple(i for i in (special.pad_id, special.cls_id, special.sep_id, special.unk_id) if i is not None),
        )
    if dataset is not None:
        from llm_ray.data.streaming import ShardSource

        return tokenizer, ShardSource(data.shards, recipe.train.objective, recipe.train.seed, masking, recipe.run.s3_endpoint,
                                      doc_attention_mask=data.doc_attention_mask)
    sep = special.eos_id if special.eos_id is not None else special.sep_id
    blocks = text_blocks(data.paths, tokenizer, data.seq_len, recipe.train.objective, sep)
    return tokenizer, TokenBlockSource(blocks, recipe.train.objective, recipe.train.seed, masking)


def pretrain_job(recipe: Recipe) -> tuple["TrainJob", Storage, Storage]:
    """(job, storage, run folder) of a pretraining recipe, every check done: what ``pretrain``
    fits, and what a Ray Tune trial builds before it fits its own trainer (``build_trainer``)."""
    storage = resolve_storage(recipe.run.storage_path, recipe.run.s3_endpoint, sse_of(recipe.run))
    run = storage.child(recipe.run.name)
    if not recipe.checkpoint.resume and _has_checkpoints(run):
        raise RecipeError(
            "checkpoint.resume", f"run {run.uri} already has checkpoints; choose another run.name "
            "or set checkpoint.resume=true to continue it"
        )
    tokenizer, source = prepare_source(recipe, run)  # before Ray: input errors are the recipe's, one line
    model_cfg = dataclasses.replace(recipe.model, vocab_size=recipe.model.vocab_size or tokenizer.get_vocab_size())
    if model_cfg.vocab_size < tokenizer.get_vocab_size():
        raise RecipeError(
            "model.vocab_size", f"{model_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.get_vocab_size()}"
        )
    check_resumable(run, dataclasses.asdict(model_cfg), tokenizer)
    check_encryption_key(recipe)
    ensure_ray()
    from llm_ray.models.converters import ModelSpec
    from llm_ray.train.objective import PRETRAINING

    job = TrainJob(recipe, ModelSpec.of(model_cfg, seed=recipe.train.seed), PRETRAINING[recipe.train.objective](),
                   source, tokenizer, _use_gpu(recipe))
    return job, storage, run


def pretrain(recipe: Recipe) -> StageResult:
    job, storage, run = pretrain_job(recipe)
    return StageResult(run.uri, fit(job, storage, run))


@dataclass
class TrainJob:
    """Everything a stage hands the engine: what to build, what loss, what data."""

    recipe: Recipe
    model: "ModelSpec"  # llm_ray.models.converters.ModelSpec
    objective: "Objective"  # llm_ray.train.objective.Objective
    source: object  # a TrainingSource (data/source.py)
    tokenizer: object  # tokenizers.Tokenizer
    use_gpu: bool


def build_trainer(job: TrainJob, storage: Storage, run: Storage):
    """The ``TorchTrainer`` of a job (not started): a Ray Tune trial builds and fits one itself
    (Tune-over-Train in Ray 2.x). Refuses to resume a run of another model or tokenizer."""
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from llm_ray.data.tokenizer import tokenizer_hash
    from llm_ray.train.loop import train_worker

    recipe = job.recipe
    if storage.is_local and recipe.run.storage_path != storage.root:
        # Ray Train workers run in a folder of their own: a relative path would put the
        # COMPLETE markers and metrics there instead of in the run folder.
        recipe = recipe.replace(f"run.storage_path={storage.root}")
    check_resumable(run, job.model.model, job.tokenizer)  # again: a Tune trial may call this directly
    run.write_text("recipe.yaml", recipe.to_yaml())
    run.write_text("tokenizer.json", job.tokenizer.to_str())
    p = recipe.parallel
    return TorchTrainer(
        train_worker,
        train_loop_config={
            "recipe": recipe.to_dict(),
            "model_spec": job.model,
            "objective": job.objective,
            "recipe_hash": job.recipe.hash(),  # the recipe as the user wrote it
            "tokenizer_hash": tokenizer_hash(job.tokenizer),
            "source": ray.put(job.source),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=p.num_workers,
            use_gpu=job.use_gpu,
            resources_per_worker={"CPU": p.cpus_per_worker, **({"GPU": 1} if job.use_gpu else {})},
        ),
        # A collective that waits longer than this fails instead of hanging the job forever.
        torch_config=TorchConfig(backend="nccl" if job.use_gpu else "gloo", timeout_s=600),
        run_config=ray.train.RunConfig(
            name=recipe.run.name,
            storage_path=storage.root,
            storage_filesystem=storage.fs,
            failure_config=ray.train.FailureConfig(max_failures=recipe.run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=recipe.checkpoint.keep),
            worker_runtime_env={"env_vars": worker_env(job.use_gpu)},
        ),
    )


def worker_env(use_gpu: bool) -> dict:
    """Environment of the training workers: the DeepSpeed accelerator and, where set, the path of
    the encryption key file (a path, not a secret; the key itself is never put in a runtime env,
    which the dashboard shows: set LLM_RAY_ENCRYPTION_KEY on the nodes, e.g. from a Secret)."""
    from llm_ray.encryption import key_file_env

    return {"DS_ACCELERATOR": "cuda" if use_gpu else "cpu", **key_file_env()}


def check_encryption_key(recipe: Recipe) -> None:
    """``checkpoint.encrypt`` without a usable key is the recipe's error, before Ray starts."""
    if recipe.checkpoint.encrypt:
        from llm_ray.encryption import EncryptionError, load_key

        try:
            load_key()
        except EncryptionError as e:
            raise RecipeError("checkpoint.encrypt", str(e)) from None


def run_trainer(trainer, job: TrainJob, run: Storage) -> dict:
    """Fit a trainer from ``build_trainer`` and write the run's ``summary.json``."""
    started = time.time()
    try:
        result = trainer.fit()
    except Exception as e:  # a worker that could not decrypt its checkpoint: one line, by name
        from llm_ray.encryption import encryption_failure

        refused = encryption_failure(e)
        if refused is None:
            raise
        raise refused from None
    metrics = dict(result.metrics or {})
    keys = ("initial_loss", "final_loss", "steps", "tokens_per_s", "mfu", "peak_tflops", "precision", "stopped_early")
    summary = {
        "run_dir": run.uri,
        "recipe_hash": job.recipe.hash(),
        "objective": job.objective.name,
        **{k: metrics.get(k) for k in keys},
        "last_step_metrics": {k: v for k, v in metrics.items() if k not in keys},
        "checkpoint": run.child(result.checkpoint.path.rstrip("/").rsplit("/", 1)[-1]).uri if result.checkpoint else None,
        "wall_s": round(time.time() - started, 2),
        "num_workers": job.recipe.parallel.num_workers,
        "use_gpu": job.use_gpu,
    }
    if hasattr(job.objective, "privacy_summary"):  # DP-SGD: the guarantee the run reached
        summary["privacy"] = job.objective.privacy_summary(summary["steps"] or 0)
    run.write_text("summary.json", json.dumps(summary, indent=2))
    return summary


def fit(job: TrainJob, storage: Storage, run: Storage) -> dict:
    """Build the trainer and run it: the engine's whole job for every stage (DP-SGD wraps the
    stage's objective when the recipe asks for it)."""
    from llm_ray.train.dp import private

    check_encryption_key(job.recipe)
    job = dataclasses.replace(job, objective=private(job.objective, job.recipe, job.source))
    return run_trainer(build_trainer(job, storage, run), job, run)
