"""The typed recipe: one source of truth for a run, from YAML through the driver to every worker.

Each section validates itself in ``__post_init__``; ``Recipe`` checks what spans sections
(batch arithmetic, pipeline vs. ZeRO, objective vs. architecture). Every error is a
``RecipeError`` naming the dotted key, raised before any Ray work starts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import yaml

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check
from llm_ray.config.prepare import PrepareConfig
from llm_ray.config.finetune import FinetuneConfig
from llm_ray.config.align import AlignConfig
from llm_ray.config.privacy import FederatedConfig, PrivacyConfig


DEFAULT_CORPUS = "jobs/data/tiny_corpus.txt"



@dataclass
class MoEConfig:
    """Mixture-of-experts FFN; ``num_experts: 0`` means a dense FFN."""

    num_experts: int = 0
    top_k: int = 2
    capacity_factor: float = 1.25  # expert capacity = factor * tokens * top_k / num_experts
    aux_loss_coef: float = 0.01  # weight of the Switch-style load-balancing loss
    every_n_layers: int = 1  # MoE FFN in layers i where (i + 1) % every_n_layers == 0

    def __post_init__(self):
        _check(self.num_experts >= 0, "num_experts", "must be >= 0")
        if self.num_experts:
            _check(1 <= self.top_k <= self.num_experts, "top_k", f"must be in 1..num_experts ({self.num_experts})")
            _check(self.capacity_factor > 0, "capacity_factor", "must be > 0")
            _check(self.every_n_layers >= 1, "every_n_layers", "must be >= 1")
        _check(self.aux_loss_coef >= 0, "aux_loss_coef", "must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.num_experts > 0


@dataclass
class ModelConfig:
    """Transformer shape. GPT-2 and Llama shapes are both just values of these fields."""

    arch: Literal["decoder", "encoder"] = "decoder"
    vocab_size: int = 0  # 0: taken from the tokenizer when the run starts
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # None: = n_heads (MHA); 1: MQA; between: GQA
    # None: d_model / n_heads; set where heads x head size != d_model (heads pruned, some imports)
    d_head: Optional[int] = None
    d_ff: Optional[int] = None  # None: 4*d (gelu) or ~8/3*d rounded to 32 (swiglu)
    max_seq_len: int = 256
    positions: Literal["rope", "learned", "sinusoidal"] = "rope"
    rope_theta: float = 10000.0
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: Literal["pre", "post"] = "pre"  # post: BERT-style, plus a norm on embeddings
    ffn: Literal["swiglu", "gelu"] = "swiglu"
    gelu_approximate: Literal["none", "tanh"] = "none"  # gelu ffn: "tanh" = GPT-2's GELU, "none" = exact (BERT)
    bias: bool = False
    tie_embeddings: bool = True
    dropout: float = 0.0
    init_std: float = 0.02
    moe: MoEConfig = field(default_factory=MoEConfig)

    def __post_init__(self):
        for name in ("d_model", "n_layers", "n_heads", "max_seq_len"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.vocab_size >= 0, "vocab_size", "must be >= 0 (0 = from the tokenizer)")
        _check(self.d_head is None or self.d_head >= 1, "d_head", "must be >= 1")
        _check(self.d_head is not None or self.d_model % self.n_heads == 0, "n_heads", f"must divide d_model ({self.d_model})")
        if self.n_kv_heads is not None:
            _check(
                1 <= self.n_kv_heads <= self.n_heads and self.n_heads % self.n_kv_heads == 0,
                "n_kv_heads",
                f"must divide n_heads ({self.n_heads})",
            )
        if self.positions == "rope":
            _check(self.head_dim % 2 == 0, "positions", f"rope needs an even head_dim, got {self.head_dim}")
        _check(self.d_ff is None or self.d_ff >= 1, "d_ff", "must be >= 1")
        _check(0.0 <= self.dropout < 1.0, "dropout", "must be in [0, 1)")
        _check(self.norm_eps > 0, "norm_eps", "must be > 0")

    @property
    def head_dim(self) -> int:
        return self.d_head or self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.ffn == "gelu":
            return 4 * self.d_model
        return 32 * -(-int(8 * self.d_model / 3) // 32)  # Llama's 8/3 d, rounded up to 32


@dataclass
class TokenizerConfig:
    path: str = ""  # tokenizer.json; trained on data.paths when missing and train_if_missing
    kind: Literal["bpe", "wordpiece"] = "bpe"
    vocab_size: int = 4096
    min_frequency: int = 2
    train_if_missing: bool = True

    def __post_init__(self):
        _check(self.vocab_size >= 32, "vocab_size", "must be >= 32")
        if self.kind == "bpe":  # 256 byte symbols + <|endoftext|> + <|pad|>
            _check(self.vocab_size >= 258, "vocab_size", "byte-level BPE needs vocab_size >= 258")
        _check(self.min_frequency >= 1, "min_frequency", "must be >= 1")


@dataclass
class DataConfig:
    # text: local text files, tokenized and packed in memory when the run starts
    # shards: packed Parquet shards written by `llm-ray data prepare` (local or s3://)
    source: Literal["text", "shards"] = "text"
    # files or folders (*.txt inside); default: the corpus bundled with the repo
    paths: list[str] = field(default_factory=lambda: [DEFAULT_CORPUS])
    shards: str = ""  # prepared dataset (the folder holding manifest.json), for source: shards
    seq_len: int = 128
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    # attention only within each packed document (block-diagonal causal), positions restarting
    # per document; needs shards prepared with prepare.keep_doc_boundaries (checked at start)
    doc_attention_mask: bool = False

    def __post_init__(self):
        _check(self.seq_len >= 2, "seq_len", "must be >= 2")
        if self.source == "text":
            _check(bool(self.paths), "paths", "needs at least one text file or folder")
        else:
            _check(bool(self.shards), "shards", "needs the prepared dataset's folder (local or s3://)")
        _check(not self.doc_attention_mask or self.source == "shards", "doc_attention_mask",
               "needs data.source: shards (prepared with prepare.keep_doc_boundaries: true)")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``lr * min_lr_ratio``."""

    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping

    def __post_init__(self):
        _check(self.lr > 0, "lr", "must be > 0")
        _check(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "must be in [0, 1]")
        _check(self.warmup_steps >= 0, "warmup_steps", "must be >= 0")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1, "beta1", "must be in [0, 1)")
        _check(0 <= self.beta2 < 1, "beta2", "must be in [0, 1)")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")


@dataclass
class TrainConfig:
    objective: Literal["causal_lm", "masked_lm"] = "causal_lm"
    mlm_probability: float = 0.15  # of which 80% [MASK], 10% random, 10% kept
    # auto: bf16 on GPUs that have it (else fp16); on CPU bf16 only where a matmul measured at
    # start is faster in bf16 than fp32 (AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = False
    global_batch_size: int = 16  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    gradient_accumulation_steps: Optional[int] = None  # None: global / (micro * data-parallel)
    max_steps: int = 100
    seed: int = 1234
    log_every: int = 10
    peak_tflops: Optional[float] = None  # per worker, for MFU; None: measure a matmul in `precision` at start

    def __post_init__(self):
        _check(0 < self.mlm_probability < 1, "mlm_probability", "must be in (0, 1)")
        _check(self.global_batch_size >= 1, "global_batch_size", "must be >= 1")
        _check(self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1")
        _check(
            self.gradient_accumulation_steps is None or self.gradient_accumulation_steps >= 1,
            "gradient_accumulation_steps",
            "must be >= 1",
        )
        _check(self.max_steps >= 1, "max_steps", "must be >= 1")
        _check(self.log_every >= 1, "log_every", "must be >= 1")
        _check(self.peak_tflops is None or self.peak_tflops > 0, "peak_tflops", "must be > 0")


@dataclass
class ParallelConfig:
    num_workers: int = 1  # Ray Train workers = pipeline_stages * data-parallel size
    zero_stage: int = 0
    pipeline_stages: int = 1  # 1: no pipeline
    offload: Literal["none", "optimizer", "params"] = "none"  # params offloads optimizer too
    use_gpu: Optional[bool] = None  # None: use GPUs when the cluster has them
    cpus_per_worker: int = 1

    def __post_init__(self):
        _check(self.num_workers >= 1, "num_workers", "must be >= 1")
        _check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}")
        _check(self.pipeline_stages >= 1, "pipeline_stages", "must be >= 1")
        _check(
            self.num_workers % self.pipeline_stages == 0,
            "pipeline_stages",
            f"must divide num_workers ({self.num_workers})",
        )
        _check(self.cpus_per_worker >= 1, "cpus_per_worker", "must be >= 1")
        if self.offload == "optimizer":
            _check(self.zero_stage >= 1, "offload", "optimizer offload needs zero_stage >= 1")
        if self.offload == "params":
            _check(self.zero_stage == 3, "offload", "parameter offload needs zero_stage 3")
        # DeepSpeed refuses ZeRO-2/3 with pipeline parallelism (GPT-NeoX validates the same).
        _check(
            not (self.pipeline_stages > 1 and self.zero_stage >= 2),
            "zero_stage",
            f"ZeRO stage {self.zero_stage} cannot be combined with pipeline_stages > 1 (use 0 or 1)",
        )

    @property
    def data_parallel_size(self) -> int:
        return self.num_workers // self.pipeline_stages


@dataclass
class CheckpointConfig:
    every_steps: int = 25  # also at the last step
    keep: int = 2  # newest checkpoints kept in storage
    resume: bool = True  # resume from the latest checkpoint of run.storage_path/run.name
    # AES-256-GCM on every checkpoint file, the key from LLM_RAY_ENCRYPTION_KEY(_FILE): never here
    encrypt: bool = False

    def __post_init__(self):
        _check(self.every_steps >= 1, "every_steps", "must be >= 1")
        _check(self.keep >= 1, "keep", "must be >= 1")


@dataclass
class RunConfig:
    name: str = "run"
    storage_path: str = "runs"  # local folder or s3://bucket/prefix
    s3_endpoint: Optional[str] = None  # for every s3:// path of the recipe; default: AWS_ENDPOINT_URL
    # server-side encryption asked of S3 for every object written (runs, checkpoints, prepared
    # shards): AES256 (SSE-S3) or aws:kms (SSE-KMS, s3_sse_kms_key_id or the account's default key)
    s3_sse: Optional[str] = None
    s3_sse_kms_key_id: Optional[str] = None
    max_failures: int = 2  # worker-group restarts by Ray Train's FailureConfig
    stop_at_step: Optional[int] = None  # planned stop after this step's checkpoint (rerun resumes)
    fail_at_step: Optional[int] = None  # fault injection: rank 0 crashes once at this step
    progress_bar: bool = True
    log_sample_ids: bool = False  # record each step's sample ids (global order) in metrics.jsonl

    def __post_init__(self):
        _check(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        _check(bool(self.storage_path), "storage_path", "must not be empty")
        _check(self.max_failures >= -1, "max_failures", "must be >= -1 (-1 = retry forever)")
        for k in ("stop_at_step", "fail_at_step"):
            v = getattr(self, k)
            _check(v is None or v >= 1, k, "must be >= 1")
        _check(self.s3_sse in (None, "AES256", "aws:kms"), "s3_sse", f"must be AES256 or aws:kms, got {self.s3_sse!r}")
        _check(not self.s3_sse_kms_key_id or self.s3_sse == "aws:kms", "s3_sse_kms_key_id", "needs run.s3_sse: aws:kms")


@dataclass
class Recipe:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)  # llm-ray sft, reward, dpo
    align: AlignConfig = field(default_factory=AlignConfig)  # llm-ray reward, dpo
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # DP-SGD
    federated: FederatedConfig = field(default_factory=FederatedConfig)  # llm-ray federated

    def __post_init__(self):
        m, t, p = self.model, self.train, self.parallel
        if p.pipeline_stages > 1:
            _check(
                m.n_layers % p.pipeline_stages == 0,
                "parallel.pipeline_stages",
                f"{p.pipeline_stages} stages do not divide model.n_layers ({m.n_layers})",
            )
            _check(m.arch == "decoder", "parallel.pipeline_stages", "pipeline parallelism supports model.arch 'decoder' only")
            _check(
                not m.moe.enabled,
                "model.moe.num_experts",
                "MoE cannot be combined with pipeline_stages > 1 (its load-balancing loss spans stages)",
            )
        dp = p.data_parallel_size
        per_step = t.micro_batch_size * dp
        if t.gradient_accumulation_steps is None:
            _check(
                t.global_batch_size % per_step == 0,
                "train.global_batch_size",
                f"{t.global_batch_size} is not a multiple of micro_batch_size ({t.micro_batch_size}) "
                f"x data-parallel size ({dp})",
            )
        else:
            want = per_step * t.gradient_accumulation_steps
            _check(
                t.global_batch_size == want,
                "train.global_batch_size",
                f"{t.global_batch_size} != micro_batch_size ({t.micro_batch_size}) x gradient_accumulation_steps "
                f"({t.gradient_accumulation_steps}) x data-parallel size ({dp}) = {want}",
            )
        want_arch = {"causal_lm": "decoder", "masked_lm": "encoder"}[t.objective]
        _check(m.arch == want_arch, "train.objective", f"{t.objective} needs model.arch '{want_arch}', got '{m.arch}'")
        _check(
            self.data.seq_len <= m.max_seq_len,
            "data.seq_len",
            f"{self.data.seq_len} exceeds model.max_seq_len ({m.max_seq_len})",
        )
        if self.align.max_prompt_tokens:
            _check(self.align.max_prompt_tokens < self.data.seq_len, "align.max_prompt_tokens",
                   f"must leave room for a response in data.seq_len ({self.data.seq_len})")
        if self.run.stop_at_step is not None:
            _check(self.run.stop_at_step < t.max_steps, "run.stop_at_step", "must be < train.max_steps")
        if self.data.doc_attention_mask:
            _check(t.objective == "causal_lm", "data.doc_attention_mask", "is for train.objective causal_lm (the decoder)")
            _check(p.pipeline_stages == 1, "data.doc_attention_mask", "cannot be combined with pipeline_stages > 1 yet")
        if self.privacy.dp.enabled:  # what per-example clipping cannot honour
            _check(p.zero_stage <= 2, "parallel.zero_stage",
                   "privacy.dp needs whole parameters on each rank for per-example gradients: ZeRO 0-2, not 3")
            _check(p.pipeline_stages == 1, "parallel.pipeline_stages", "privacy.dp cannot clip per example across pipeline stages")
            _check(self.optim.grad_clip == 0, "optim.grad_clip", "privacy.dp clips each example's gradient itself: set optim.grad_clip: 0")
            _check(not m.moe.enabled, "model.moe.num_experts", "privacy.dp: the MoE load-balancing loss is not clipped per example")
            _check(m.dropout == 0, "model.dropout", "privacy.dp: per-example norms need the same forward as the step (no dropout)")

    @property
    def grad_accum_steps(self) -> int:
        return self.train.global_batch_size // (self.train.micro_batch_size * self.parallel.data_parallel_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, *overrides: str) -> "Recipe":
        return from_dict(Recipe, apply_overrides(self.to_dict(), list(overrides)))


def load_recipe(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Recipe:
    """Load a YAML recipe (or the embedded default when ``path`` is None) and apply ``--set``s."""
    data = load_yaml(path) if path else {}
    return from_dict(Recipe, apply_overrides(data, list(overrides or [])))
