"""``llm-ray dpo``: direct preference optimisation (DPO, IPO, conservative DPO) on the engine.

The reference policy is the starting model, in one of three forms (``align.dpo.reference``):
a frozen copy built once per worker; with LoRA, the trained model itself with its adapters
switched off (no second copy of the weights in memory); or log-probs precomputed in one Ray
task before training (``precompute_reference``) and carried in the batch, so a step costs no
reference forward at all. The written folder is a plain decoder folder (adapters merged).
"""

from __future__ import annotations

import time

import numpy as np

from llm_ray.config import Recipe
from llm_ray.config.loader import check
from llm_ray.stage import StageResult, write_summary


def reference_kind(recipe: Recipe) -> str:
    d, lora = recipe.align.dpo, recipe.finetune.lora.enabled
    kind = d.reference if d.reference != "auto" else ("adapters_off" if lora else "frozen_copy")
    check(kind != "adapters_off" or lora, "align.dpo.reference", "adapters_off needs LoRA (finetune.lora.r > 0)")
    return kind


def pair_logps(spec, arrays: dict[str, np.ndarray], average: bool, precision: str = "fp32") -> dict[str, np.ndarray]:
    """{"chosen", "rejected"}: sequence log-probs (N,) of each side under the model ``spec``
    builds, run in ``precision`` (``auto`` is resolved here, as a training worker would)."""
    from llm_ray.align.evaluate import logps_of
    from llm_ray.train.device import DTYPES, local_device, resolve_precision

    device = local_device()
    if precision == "auto":
        precision = resolve_precision("auto", device)[0]
    model = spec.build().to(device=device, dtype=DTYPES[precision]).eval()
    return {side: logps_of(model, arrays[f"{side}_input_ids"], arrays[f"{side}_labels"], device,
                           average=average).astype(np.float32)
            for side in ("chosen", "rejected")}


def precompute_reference(spec, arrays: dict, average: bool, recipe: Recipe, use_gpu: bool) -> dict[str, np.ndarray]:
    """The reference's ``pair_logps`` in one Ray task with a worker's resources (a GPU when
    training has them) and the training precision, so they match a frozen copy's."""
    import ray

    task = ray.remote(num_cpus=recipe.parallel.cpus_per_worker, num_gpus=1 if use_gpu else 0)(pair_logps)
    rows = {k: v for k, v in arrays.items() if k.endswith(("input_ids", "labels"))}
    logps = ray.get(task.remote(spec, rows, average, recipe.train.precision))
    return {f"ref_{side}_logps": v for side, v in logps.items()}


def implicit_reward_metrics(policy: dict, ref: dict, beta: float, held) -> dict:
    """Pair figures of β·(log π − log π_ref) and, for reference, of the policy's own log-probs."""
    from llm_ray.align.evaluate import pair_metrics, response_tokens

    tokens = response_tokens(held.chosen_labels), response_tokens(held.rejected_labels)
    implicit = pair_metrics(beta * (policy["chosen"] - ref["chosen"]), beta * (policy["rejected"] - ref["rejected"]), *tokens)
    plain = pair_metrics(policy["chosen"], policy["rejected"], *tokens)
    return {**implicit, "logp_accuracy": plain["accuracy"], "logp_margin": plain["mean_margin"]}


def dpo(recipe: Recipe) -> StageResult:
    from llm_ray.align.objectives import DPO
    from llm_ray.align.reward import data_summary, preference_data
    from llm_ray.bundle import load_bundle, save_bundle
    from llm_ray.data.source import ArraySource
    from llm_ray.models.converters import LoadWeights, ModelSpec, param_counts
    from llm_ray.train import tuning
    from llm_ray.train.launcher import _use_gpu, ensure_ray

    started = time.time()
    tuned = tuning.start(recipe, "dpo", arch="decoder")  # before any Ray work
    recipe, ft, d, out_dir = tuned.recipe, tuned.recipe.finetune, tuned.recipe.align.dpo, tuned.out_dir
    kind = reference_kind(recipe)
    train, held, rejects, template = preference_data(tuned)
    rejects_file = tuned.write_rejects(rejects)

    spec = tuned.spec([tuned.init_weights] + tuning.converters_for(ft))
    ref_spec = tuned.spec([tuned.init_weights])
    counts = param_counts(spec.build())
    average = d.loss == "ipo"
    held_ref = pair_logps(ref_spec, held.arrays(), average)  # before training the policy IS the reference
    before = implicit_reward_metrics(held_ref, held_ref, d.beta, held)

    arrays = train.arrays()
    if d.precompute_reference:
        ensure_ray()
        pre_started = time.time()
        arrays.update(precompute_reference(ref_spec, arrays, average, recipe, _use_gpu(recipe)))
        precompute_s, kind = round(time.time() - pre_started, 2), "precomputed"
    objective = DPO(d.beta, d.loss, d.label_smoothing, kind, ref_spec if kind == "frozen_copy" else None)
    train_summary = tuned.train(spec, objective, ArraySource(arrays, recipe.train.seed))

    trained, manifest, ckpt = tuning.trained_module(tuned, spec)
    provenance = {**tuned.provenance(manifest, ckpt, "dpo"), "dpo": {"beta": d.beta, "loss": d.loss, "reference": kind}}
    save_bundle(spec.finalize(trained).cpu(), recipe.model, tuned.bundle.tokenizer.to_str(), out_dir, provenance,
                tuned.tokenizer_config(template))
    del trained
    policy = ModelSpec.of(recipe.model, [LoadWeights(f"{out_dir}/model.safetensors")])  # the folder as written
    after = implicit_reward_metrics(pair_logps(policy, held.arrays(), average), held_ref, d.beta, held)
    load_bundle(out_dir)  # the folder loads strictly
    last = train_summary["last_step_metrics"]
    summary = {
        "out_dir": out_dir,
        "run_dir": tuned.run.uri,
        "init_from": ft.init_from,
        "reference": kind,
        "precompute_reference_s": precompute_s if d.precompute_reference else None,
        **data_summary(train, held, rejects, rejects_file),
        **{f"eval_{k}_before": v for k, v in before.items()},
        **{f"eval_{k}_after": v for k, v in after.items()},
        **tuning.training_figures(train_summary),
        **{f"last_{k}": v for k, v in last.items() if k.startswith(("rewards/", "logps/"))},
        **counts,
        "lora": ft.lora.enabled,
        "wall_s": round(time.time() - started, 2),
    }
    return write_summary(out_dir, summary)
