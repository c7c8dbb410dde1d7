"""Preference learning's objectives on the engine's seam (``llm_ray.train.objective``).

Both take a batch of preference pairs (``data/preference.py``): chosen and rejected rows of the
same length, stacked into ONE forward of 2B rows, so the two halves of a pair see the same
weights, dropout draw aside, and the step pays one pass over the weights instead of two.
Metric names follow TRL / OpenRLHF so dashboards read the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from llm_ray.models.converters import ModelSpec
from llm_ray.models.losses import dpo_loss, pairwise_reward_loss, sequence_logprobs
from llm_ray.train.objective import Objective

PAIR_FIELDS = ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels")


def stacked(batch: dict[str, torch.Tensor], field: str) -> torch.Tensor:
    """chosen then rejected along the batch: (B, ...) twice -> (2B, ...)."""
    return torch.cat([batch[f"chosen_{field}"], batch[f"rejected_{field}"]])


@dataclass
class PairwiseReward(Objective):
    """Bradley-Terry loss of a ``RewardModel``: -log σ(r_c − r_r − margin) (+ centering)."""

    center_coef: float = 0.0
    name = "reward"
    batch_fields = ("chosen_input_ids", "rejected_input_ids", "chosen_length", "rejected_length", "margin")
    sequences_per_sample = 2

    def loss(self, engine, batch, frozen):
        rewards = engine(stacked(batch, "input_ids"), stacked(batch, "length"))  # (2B,)
        chosen, rejected = rewards.float().chunk(2)
        loss = pairwise_reward_loss(chosen, rejected, batch["margin"], self.center_coef)
        return loss, {
            "accuracy": (chosen > rejected).float().mean(),
            "margin": (chosen - rejected).mean(),
            "reward_chosen": chosen.mean(),
            "reward_rejected": rejected.mean(),
        }


@dataclass
class DPO(Objective):
    """Direct preference optimisation against a reference policy.

    ``reference``: ``frozen_copy`` — a frozen model built from ``reference_spec`` on every
    worker; ``adapters_off`` — the trained model itself with its LoRA adapters switched off (the
    starting policy, no second copy); ``precomputed`` — the batch carries ``ref_chosen_logps``
    and ``ref_rejected_logps`` computed in one pass before training.
    """

    beta: float
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    reference: str = "frozen_copy"
    reference_spec: Optional[ModelSpec] = None
    name = "dpo"
    batch_fields = PAIR_FIELDS
    sequences_per_sample = 2

    def __post_init__(self):
        if self.reference == "frozen_copy" and self.reference_spec is None:
            raise ValueError("DPO with a frozen_copy reference needs reference_spec")
        if self.reference == "precomputed":
            self.batch_fields = PAIR_FIELDS + ("ref_chosen_logps", "ref_rejected_logps")

    @property
    def frozen_forwards(self) -> int:  # for MFU: the reference's forward over the same rows
        return 0 if self.reference == "precomputed" else 1

    def frozen_models(self) -> dict[str, ModelSpec]:
        return {"reference": self.reference_spec} if self.reference == "frozen_copy" else {}

    @property
    def average_logps(self) -> bool:
        return self.loss_type == "ipo"  # IPO's target 1/(2β) is on length-averaged log-probs

    def reference_logps(self, engine, ids: torch.Tensor, labels: torch.Tensor, batch, frozen) -> torch.Tensor:
        if self.reference == "precomputed":
            return torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
        with torch.no_grad():
            if self.reference == "adapters_off":
                from llm_ray.models.lora import adapters_disabled

                with adapters_disabled(engine.module):
                    logits = engine(ids)
            else:
                logits = frozen["reference"](ids)
            return sequence_logprobs(logits, labels, self.average_logps)

    def loss(self, engine, batch, frozen):
        ids, labels = stacked(batch, "input_ids"), stacked(batch, "labels")  # (2B, T)
        policy = sequence_logprobs(engine(ids), labels, self.average_logps)  # (2B,)
        ref = self.reference_logps(engine, ids, labels, batch, frozen)
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        losses, chosen_rewards, rejected_rewards = dpo_loss(pc, pr, rc, rr, self.beta, self.loss_type, self.label_smoothing)
        return losses.mean(), {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "logps/chosen": pc.detach().mean(),
            "logps/rejected": pr.detach().mean(),
        }


@dataclass
class RLObjective(Objective):
    """An objective trained on rollouts that publishes its model to the hub after each
    iteration's last step and at start (a resumed run's pools must use the resumed weights)."""

    hub: object  # ExperienceHubActor handle
    steps_per_iteration: int
    max_steps: int
    bucket_mb: float = 32.0
    timeout_s: float = 300.0
    channel: str = "policy"  # which model's weights: policy (rollout pool) or critic

    def _publish(self, engine, step: int) -> None:
        from llm_ray.align.experience import publish_weights

        publish_weights(engine, self.hub, self.channel, step // self.steps_per_iteration, self.bucket_mb, self.timeout_s)

    def on_train_start(self, engine, step: int) -> None:
        self._publish(engine, step)

    def after_step(self, engine, step: int) -> None:
        if step % self.steps_per_iteration == 0 and step < self.max_steps:
            self._publish(engine, step)


@dataclass
class ValueRegression(RLObjective):
    """PPO's critic: the clipped value loss against the GAE returns of the rollouts."""

    value_clip: float = 0.2  # 0: unclipped
    name: str = "value"
    batch_fields = ("input_ids", "labels", "old_values", "returns")

    def loss(self, engine, batch, frozen):
        from llm_ray.models.losses import IGNORE_INDEX, masked_mean, value_loss

        mask = batch["labels"] != IGNORE_INDEX
        values = engine(batch["input_ids"])  # (B, T)
        loss, metrics = value_loss(values, batch["old_values"], batch["returns"], mask, self.value_clip or None)
        metrics["value_mean"] = masked_mean(values.detach().float(), mask)
        metrics["return_mean"] = masked_mean(batch["returns"].float(), mask)
        return loss, metrics


@dataclass
class PolicyGradient(RLObjective):
    """PPO's clipped policy loss on rollouts (GRPO is this loss with group advantages).

    The batch (``align/experience.py``): full sequences ``input_ids``/``labels`` (response
    tokens labelled), the rollout's ``old_logprobs``, the reference's ``ref_logprobs``,
    per-token ``advantages``, and ``rewards``/``fresh`` for metrics. Log-probs are of the
    tempered policy (logits / temperature), the distribution the rollout sampled from.
    ``kl_coef`` > 0 adds β·KL(π ‖ π_ref) to the loss (GRPO); PPO puts it in the reward instead.
    After each iteration's last step the policy is published to the hub for the rollout pool.
    """

    temperature: float = 1.0
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0
    aggregate: str = "token_mean"
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    name: str = "policy_gradient"
    batch_fields = ("input_ids", "labels", "old_logprobs", "ref_logprobs", "advantages", "rewards", "fresh")

    def loss(self, engine, batch, frozen):
        from llm_ray.models.losses import IGNORE_INDEX, entropy_from_logits, kl_penalty, masked_mean, policy_loss, token_logprobs

        labels = batch["labels"]
        mask = labels != IGNORE_INDEX
        logits = engine(batch["input_ids"]).float() / self.temperature  # (B, T, V)
        logp = token_logprobs(logits, labels)  # (B, T)
        loss, metrics = policy_loss(logp, batch["old_logprobs"], batch["advantages"], mask, self.clip_eps,
                                    self.clip_eps_high or None, self.aggregate)
        metrics["policy_loss"] = loss.detach()
        kl = kl_penalty(logp, batch["ref_logprobs"], self.kl_estimator)
        metrics["kl"] = masked_mean(kl, mask).detach()
        if self.kl_coef:
            loss = loss + self.kl_coef * masked_mean(kl, mask)
        entropy = masked_mean(entropy_from_logits(logits), mask)
        metrics["entropy"] = entropy.detach()
        if self.entropy_coef:
            loss = loss - self.entropy_coef * entropy
        metrics["reward"] = batch["rewards"].float().mean()
        metrics["response_length"] = mask.sum(1).float().mean()
        if bool(batch["fresh"].all()):  # same weights as the rollout: any difference is numerics
            metrics["logprob_mismatch"] = masked_mean((logp - batch["old_logprobs"]).abs(), mask).detach()
        return loss, metrics
