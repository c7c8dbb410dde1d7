"""Recipe section ``align``: preference learning (``llm-ray reward``, ``llm-ray dpo``) and RL
(``llm-ray ppo``: PPO and GRPO).

The model to tune, LoRA, freezing, the data files and the output folder come from the
``finetune`` section, as for ``llm-ray sft``; this section holds what preference learning adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from llm_ray.config.loader import check as _check


@dataclass
class RewardConfig:
    """Bradley-Terry reward model: a scalar head on the pooled last real token."""

    center_coef: float = 0.0  # TRL's center_rewards_coefficient: coef * mean((r_c + r_r)^2)
    pooling: Literal["auto", "last", "mean", "cls"] = "auto"  # auto: last (decoder), cls (encoder)

    def __post_init__(self):
        _check(self.center_coef >= 0, "center_coef", "must be >= 0")


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the KL leash to the reference policy
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # DPO (Rafailov 2023) or IPO (Azar 2023)
    label_smoothing: float = 0.0  # > 0: conservative DPO (labels flipped with this probability)
    # auto: adapters_off with LoRA (the same weights, adapters switched off: no second copy),
    # else frozen_copy (the starting policy built once per worker, frozen)
    reference: Literal["auto", "frozen_copy", "adapters_off"] = "auto"
    precompute_reference: bool = False  # one pass of reference log-probs before training, reused

    def __post_init__(self):
        _check(self.beta > 0, "beta", "must be > 0")
        _check(0 <= self.label_smoothing < 0.5, "label_smoothing", "must be in [0, 0.5)")
        _check(self.loss == "sigmoid" or self.label_smoothing == 0, "label_smoothing",
               "applies to the sigmoid loss only (conservative DPO); use 0 with ipo")


@dataclass
class PoolConfig:
    """One Ray actor pool of ``llm-ray ppo``: how many actors and what each reserves."""

    num_actors: int = 1
    num_cpus: float = 0.5
    num_gpus: float = 0.0

    def __post_init__(self):
        _check(self.num_actors >= 1, "num_actors", "must be >= 1")
        _check(self.num_cpus >= 0 and self.num_gpus >= 0, "num_cpus", "resources must be >= 0")


@dataclass
class RewardSourceConfig:
    """Where rewards come from: a Python function, a reward-model folder, or an HTTP endpoint."""

    # "module:function" called as fn(prompts, completions) -> list[float] (TRL's reward_funcs
    # signature); the module is imported from the working directory or the installed packages
    function: str = ""
    model: str = ""  # a folder written by `llm-ray reward`
    url: str = ""  # POST {"prompts": [...], "completions": [...]} -> {"rewards": [...]}

    def __post_init__(self):
        given = [k for k in ("function", "model", "url") if getattr(self, k)]
        _check(len(given) <= 1, given[-1] if given else "function", f"give one reward source, got {given}")
        _check(not self.function or ":" in self.function, "function", f"must be 'module:function', got {self.function!r}")

    @property
    def kind(self) -> str:
        return next((k for k in ("function", "model", "url") if getattr(self, k)), "")


POOLS = {"rollout": "rollout", "reward": "reward_pool", "reference": "reference", "critic": "critic"}  # pool -> its key


@dataclass
class PPOConfig:
    """PPO (InstructGPT's RLHF step) and GRPO. Prompts come from ``finetune.train_path``
    (JSONL/Parquet with ``prompt`` or ``messages``, local or s3://); the policy from
    ``finetune.init_from``. ``train.max_steps`` and ``train.global_batch_size`` are derived:
    iterations x ppo_epochs x minibatches optimizer steps of one minibatch each."""

    estimator: Literal["ppo", "grpo"] = "grpo"
    iterations: int = 10  # rollout -> update rounds
    prompts_per_iteration: int = 8
    samples_per_prompt: int = 4  # GRPO's group size (>= 2); PPO: usually 1
    max_new_tokens: int = 16
    temperature: float = 1.0  # RL samples from the tempered policy only (no top-k/p: the ratio
    # of the trainer would not be the sampler's)
    ppo_epochs: int = 1
    minibatches: int = 1  # per epoch
    clip_eps: float = 0.2
    clip_eps_high: float = 0.0  # 0: = clip_eps; > clip_eps: DAPO's clip-higher
    loss_aggregate: Literal["token_mean", "seq_mean"] = "token_mean"
    gamma: float = 1.0
    lam: float = 0.95
    value_clip: float = 0.2  # 0: no value clipping
    whiten_advantages: bool = True  # PPO; GRPO normalizes within each group instead
    group_scale: bool = True  # GRPO: divide by the group's std (False: Dr. GRPO)
    entropy_coef: float = 0.0
    kl_coef: float = 0.05  # the initial coefficient when kl_target > 0
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in: Literal["auto", "reward", "loss"] = "auto"  # auto: reward (PPO), loss (GRPO)
    kl_target: float = 0.0  # > 0: adaptive controller (Ziegler et al. 2019)
    kl_horizon: int = 10000  # samples over which the adaptive coefficient moves
    reward: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    # a second, held-out judge scored on the same samples but never trained on: when the
    # reward rises while the judge falls, the monitor warns (the policy games the reward)
    judge: RewardSourceConfig = field(default_factory=RewardSourceConfig)
    rollout: PoolConfig = field(default_factory=PoolConfig)
    reward_pool: PoolConfig = field(default_factory=PoolConfig)
    reference: PoolConfig = field(default_factory=PoolConfig)
    critic: PoolConfig = field(default_factory=PoolConfig)
    # pools hosted together: actor i of each named pool is one process (one torch runtime, one
    # model-loading copy of the tokenizer and, on a GPU, one CUDA context instead of one per
    # pool); its resources are the members' summed. E.g. [rollout, reference, reward]
    colocate: list[str] = field(default_factory=list)
    # PPO's value model: auto = the reward model's backbone and head when reward.model is given
    # (OpenRLHF's default), else the policy's backbone with a fresh head
    critic_from: Literal["auto", "reward_model", "policy"] = "auto"
    critic_lr: float = 0.0  # 0: optim.lr
    rollout_batch_size: int = 32  # the rollout engine's max_batch_size
    weight_sync_bucket_mb: float = 32.0  # tensors per message in the policy -> rollout sync
    timeout_s: float = 300.0  # every cross-pool call; a timeout is an error naming the pool
    max_actor_restarts: int = 3  # per pool, before the run fails

    def __post_init__(self):
        for key in ("iterations", "prompts_per_iteration", "samples_per_prompt", "max_new_tokens", "ppo_epochs", "minibatches", "rollout_batch_size"):
            _check(getattr(self, key) >= 1, key, "must be >= 1")
        _check(self.estimator != "grpo" or self.samples_per_prompt >= 2, "samples_per_prompt", "GRPO needs >= 2 samples per prompt (a group)")
        _check((self.prompts_per_iteration * self.samples_per_prompt) % self.minibatches == 0, "minibatches",
               f"must divide prompts_per_iteration x samples_per_prompt ({self.prompts_per_iteration * self.samples_per_prompt})")
        _check(0 < self.temperature <= 2, "temperature", "must be in (0, 2]")
        _check(0 < self.clip_eps < 1, "clip_eps", "must be in (0, 1)")
        _check(self.clip_eps_high == 0 or self.clip_eps_high >= self.clip_eps, "clip_eps_high", "0 or >= clip_eps")
        _check(0 < self.gamma <= 1 and 0 <= self.lam <= 1, "gamma", "gamma in (0, 1], lam in [0, 1]")
        _check(self.kl_coef >= 0 and self.kl_target >= 0 and self.entropy_coef >= 0, "kl_coef", "coefficients must be >= 0")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        _check(self.weight_sync_bucket_mb > 0, "weight_sync_bucket_mb", "must be > 0")
        _check(self.critic_from != "reward_model" or self.reward.kind == "model", "critic_from",
               "reward_model needs reward.model (a folder written by `llm-ray reward`)")
        _check(self.critic_lr >= 0, "critic_lr", "must be >= 0 (0 = optim.lr)")
        unknown = sorted(set(self.colocate) - set(POOLS))
        _check(not unknown, "colocate", f"unknown pools {unknown}; pools are {list(POOLS)}")
        _check(len(set(self.colocate)) == len(self.colocate) and len(self.colocate) != 1, "colocate",
               "name two or more pools, each once")
        _check(self.estimator == "ppo" or "critic" not in self.colocate, "colocate", "GRPO has no critic pool")
        sizes = {p: self.pool(p).num_actors for p in self.colocate}
        _check(len(set(sizes.values())) <= 1, "colocate", f"colocated pools need the same num_actors, got {sizes}")

    def pool(self, name: str) -> PoolConfig:
        """The resources of pool ``name`` (rollout, reward, reference, critic)."""
        return getattr(self, POOLS[name])

    @property
    def kl_placement(self) -> str:
        return self.kl_in if self.kl_in != "auto" else ("reward" if self.estimator == "ppo" else "loss")

    @property
    def rollout_samples(self) -> int:
        return self.prompts_per_iteration * self.samples_per_prompt

    @property
    def steps_per_iteration(self) -> int:
        return self.ppo_epochs * self.minibatches


@dataclass
class AlignConfig:
    # prompts longer than this keep their last tokens (counted); 0: half of data.seq_len
    max_prompt_tokens: int = 0
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)

    def __post_init__(self):
        _check(self.max_prompt_tokens >= 0, "max_prompt_tokens", "must be >= 0 (0 = half of data.seq_len)")
