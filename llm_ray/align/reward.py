"""``llm-ray reward``: a Bradley-Terry reward model on the engine, and ``score`` for RL.

Driver: read the ``init_from`` folder (decoder or encoder), turn preference pairs into token
rows (``data/preference.py``), add a scalar head (``ClassifierHead(1)``: a ``RewardModel``),
optionally freeze or wrap LoRA, and train with the ``PairwiseReward`` objective — ZeRO 0–3
and several workers come from the engine. The model folder it writes is a classifier folder of
kind ``reward``; ``summary.json`` has the held-out pair accuracy, margin, calibration and
reward/length correlation before and after.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Optional, Sequence, Union

import numpy as np
import torch

from llm_ray.config import Recipe
from llm_ray.stage import StageResult, write_summary


def preference_data(tuned):
    """(train, held-out, rejects, chat template) of a tuned run's preference files."""
    from llm_ray.data.preference import load_preference_data
    from llm_ray.data.sft import ChatTemplate

    r, ft = tuned.recipe, tuned.recipe.finetune
    train, held, rejects = load_preference_data(
        ft.train_path, ft.eval_path or None, ft.eval_fraction, r.train.seed, tuned.bundle, r.data.seq_len,
        r.align.max_prompt_tokens or r.data.seq_len // 2, ft.system_prompt, r.run.s3_endpoint,
    )
    return train, held, rejects, ChatTemplate.for_bundle(tuned.bundle)


def data_summary(train, held, rejects: list[dict], rejects_file: str) -> dict:
    return {
        "train_pairs": len(train),
        "eval_pairs": len(held),
        "rejected": len(rejects),
        "rejected_by_reason": dict(sorted(Counter(r["reason"] for r in rejects).items())),
        "rejects_file": rejects_file,
        "prompt_truncated": train.prompt_truncated + held.prompt_truncated,
        "response_truncated": train.response_truncated + held.response_truncated,
    }


def evaluate_reward(model, held, device) -> dict:
    from llm_ray.align.evaluate import pair_metrics, response_tokens, rewards_of

    model.to(device)
    chosen = rewards_of(model, held.chosen_input_ids, held.chosen_length, device)
    rejected = rewards_of(model, held.rejected_input_ids, held.rejected_length, device)
    return pair_metrics(chosen, rejected, response_tokens(held.chosen_labels), response_tokens(held.rejected_labels))


def reward(recipe: Recipe) -> StageResult:
    from llm_ray.align.objectives import PairwiseReward
    from llm_ray.bundle import load_classifier, save_classifier
    from llm_ray.data.source import ArraySource
    from llm_ray.generation.api import pad_id_for
    from llm_ray.models.converters import ClassifierHead, param_counts
    from llm_ray.train import tuning
    from llm_ray.train.device import local_device

    started = time.time()
    tuned = tuning.start(recipe, "reward")  # before any Ray work
    recipe, ft, out_dir = tuned.recipe, tuned.recipe.finetune, tuned.out_dir
    train, held, rejects, template = preference_data(tuned)
    rejects_file = tuned.write_rejects(rejects)

    device = local_device()
    head = ClassifierHead(1, pad_id_for(tuned.bundle), recipe.align.reward.pooling)
    spec = tuned.spec([tuned.init_weights] + tuning.converters_for(ft, [head]))
    start_model = spec.build()
    counts = param_counts(start_model)
    before = evaluate_reward(start_model, held, device)
    del start_model

    train_summary = tuned.train(spec, PairwiseReward(recipe.align.reward.center_coef), ArraySource(train.arrays(), recipe.train.seed))
    trained, manifest, ckpt = tuning.trained_module(tuned, spec)
    provenance = {**tuned.provenance(manifest, ckpt, "reward"), "reward_center_coef": recipe.align.reward.center_coef}
    save_classifier(spec.finalize(trained).cpu(), ["reward"], tuned.bundle.tokenizer.to_str(), out_dir, provenance,
                    tuned.tokenizer_config(template))
    del trained
    after = evaluate_reward(load_classifier(out_dir, device=str(device))[0], held, device)  # as a user reloads it
    summary = {
        "out_dir": out_dir,
        "run_dir": tuned.run.uri,
        "init_from": ft.init_from,
        **data_summary(train, held, rejects, rejects_file),
        **{f"eval_{k}_before": v for k, v in before.items()},
        **{f"eval_{k}_after": v for k, v in after.items()},
        **tuning.training_figures(train_summary),
        "train_accuracy_last": train_summary["last_step_metrics"].get("accuracy"),
        **counts,
        "lora": ft.lora.enabled,
        "wall_s": round(time.time() - started, 2),
    }
    return write_summary(out_dir, summary)


Prompt = Union[str, list[dict]]


class RewardScorer:
    """A reward-model folder loaded once: ``scorer(prompts, responses) -> rewards``, each
    prompt (a string or a message list) and response rendered with the folder's chat template
    exactly as in training (prompt's end and response's start kept when too long). What the
    PPO issue's reward actors hold."""

    def __init__(self, model_dir: str, device: Optional[str] = None, batch_size: int = 16, max_len: Optional[int] = None):
        from llm_ray.bundle import load_bundle, load_classifier
        from llm_ray.data.sft import ChatTemplate
        from llm_ray.generation.api import pad_id_for
        from llm_ray.train.device import local_device

        self.device = device or str(local_device())
        self.model = load_classifier(model_dir, device=self.device)[0]
        folder = load_bundle(model_dir)  # tokenizer, template and specials (its weights are the backbone's)
        self.tokenizer, self.template, self.pad_id = folder.tokenizer, ChatTemplate.for_bundle(folder), pad_id_for(folder)
        self.seq_len = max_len or folder.cfg.max_seq_len - 1
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> list[float]:
        from llm_ray.align.evaluate import rewards_of
        from llm_ray.data.preference import encode_response

        if len(prompts) != len(responses):
            raise ValueError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        rows, lengths = [], []
        for prompt, response in zip(prompts, responses):
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
            ids, _, n, _, _ = encode_response(messages, response, self.template, self.tokenizer, self.seq_len, self.pad_id, self.seq_len // 2)
            rows.append(ids)
            lengths.append(n)
        return rewards_of(self.model, np.stack(rows), np.asarray(lengths, np.int64), self.device, self.batch_size).tolist()


def score(model_dir: str, prompts: Sequence[Prompt], responses: Sequence[str], device: Optional[str] = None,
          batch_size: int = 16, max_len: Optional[int] = None) -> list[float]:
    """Rewards of ``responses`` to ``prompts`` under a reward-model folder (``RewardScorer``)."""
    return RewardScorer(model_dir, device, batch_size, max_len)(prompts, responses)
