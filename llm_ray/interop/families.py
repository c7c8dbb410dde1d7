"""Model families shared with Hugging Face: config translation and one weight-name table each.

A family maps a ``transformers`` config to our ``ModelConfig`` (refusing any field our models
cannot reproduce exactly, naming it) and back, and lists ``Rule``s that pair our parameter
names with Hugging Face's. The same table serves import (HF -> ours) and export (ours -> HF).

Imports neither torch nor transformers at module load: ``import llm_ray.interop`` stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from llm_ray.config import ModelConfig


class InteropError(ValueError):
    """A checkpoint or model shape has no exact counterpart; the message names the field."""


@dataclass(frozen=True)
class Rule:
    """Our tensor names <-> Hugging Face tensor names, and how the values relate.

    kind: ``copy``; ``conv1d`` (GPT-2's Conv1D stores (in, out), nn.Linear (out, in));
    ``conv1d_qkv`` / ``qkv_bias`` (GPT-2's fused c_attn split into q, k, v);
    ``add_type0`` (BERT: position table + token-type-0 row, import only).
    """

    ours: tuple[str, ...]
    hf: tuple[str, ...]
    kind: str = "copy"


def _copy(ours: str, hf: str) -> Rule:
    return Rule((ours,), (hf,))


def _get(hf_config, name: str, default: Any = None) -> Any:
    return getattr(hf_config, name, default)


def _require(cond: bool, field: str, message: str) -> None:
    if not cond:
        raise InteropError(f"{field}: {message}")


def rope_theta(hf_config) -> float:
    """RoPE base from a v5 ``rope_parameters`` dict or a v4 ``rope_theta`` field; plain RoPE only."""
    params = _get(hf_config, "rope_parameters") or {}
    scaling = _get(hf_config, "rope_scaling")
    for field, value in (("rope_parameters", params), ("rope_scaling", scaling)):
        if isinstance(value, dict):
            kind = value.get("rope_type", value.get("type", "default"))
            _require(kind == "default", f"{field}.rope_type", f"{kind!r} RoPE scaling is not supported (plain RoPE only)")
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(_get(hf_config, "rope_theta", 10000.0))


# --------------------------------------------------------------------------------------------
# Llama (SmolLM2 and other Llama-architecture checkpoints)


def llama_config(c) -> ModelConfig:
    d, heads = c.hidden_size, c.num_attention_heads
    _require(c.hidden_act == "silu", "hidden_act", f"{c.hidden_act!r}: llama import supports 'silu' (SwiGLU) only")
    head_dim = _get(c, "head_dim") or d // heads  # heads x head_dim may differ from d (pruned heads)
    attn_bias, mlp_bias = bool(_get(c, "attention_bias", False)), bool(_get(c, "mlp_bias", False))
    _require(attn_bias == mlp_bias, "attention_bias", f"{attn_bias} with mlp_bias {mlp_bias}: our bias is one flag")
    _require((_get(c, "pretraining_tp") or 1) == 1, "pretraining_tp", "must be 1")
    return ModelConfig(
        arch="decoder",
        vocab_size=c.vocab_size,
        d_model=d,
        n_layers=c.num_hidden_layers,
        n_heads=heads,
        n_kv_heads=_get(c, "num_key_value_heads") or heads,
        d_head=None if head_dim * heads == d else head_dim,
        d_ff=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        positions="rope",
        rope_theta=rope_theta(c),
        norm="rmsnorm",
        norm_eps=float(c.rms_norm_eps),
        norm_position="pre",
        ffn="swiglu",
        bias=attn_bias,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", False)),
    )


def llama_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [_copy("embedding.tok.weight", "model.embed_tokens.weight")]
    params = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"model.layers.{i}."
        rules.append(_copy(ours + "attn_norm.weight", hf + "input_layernorm.weight"))
        rules.append(_copy(ours + "ffn_norm.weight", hf + "post_attention_layernorm.weight"))
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            rules += [_copy(f"{ours}attn.{proj}.{p}", f"{hf}self_attn.{proj}.{p}") for p in params]
        for name in ("gate", "up", "down"):
            rules += [_copy(f"{ours}ffn.{name}.{p}", f"{hf}mlp.{name}_proj.{p}") for p in params]
    rules.append(_copy("head.norm.weight", "model.norm.weight"))
    rules.append(_copy("head.proj.weight", "lm_head.weight"))
    return rules


def llama_hf_config(cfg: ModelConfig, specials: dict):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        tie_word_embeddings=cfg.tie_embeddings,
        architectures=["LlamaForCausalLM"],
        **specials,
    )


# --------------------------------------------------------------------------------------------
# GPT-2

# HF activation names -> torch's F.gelu(approximate=...)
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


def gpt2_config(c) -> ModelConfig:
    act = c.activation_function
    _require(_GELU.get(act) is not None, "activation_function", f"{act!r}: supported are gelu_new, gelu_pytorch_tanh, gelu")
    _require(bool(_get(c, "scale_attn_weights", True)), "scale_attn_weights", "False is not supported")
    _require(not _get(c, "scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx", "True is not supported")
    _require(not _get(c, "add_cross_attention", False), "add_cross_attention", "True is not supported")
    return ModelConfig(
        arch="decoder",
        vocab_size=c.vocab_size,
        d_model=c.n_embd,
        n_layers=c.n_layer,
        n_heads=c.n_head,
        n_kv_heads=None,
        d_ff=c.n_inner or 4 * c.n_embd,
        max_seq_len=c.n_positions,
        positions="learned",
        norm="layernorm",
        norm_eps=float(c.layer_norm_epsilon),
        norm_position="pre",
        ffn="gelu",
        gelu_approximate=_GELU[act],
        bias=True,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", True)),
    )


def gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [
        _copy("embedding.tok.weight", "transformer.wte.weight"),
        _copy("embedding.pos.weight", "transformer.wpe.weight"),
    ]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"transformer.h.{i}."
        qkv = tuple(f"{ours}attn.{p}_proj" for p in "qkv")
        rules += [
            _copy(ours + "attn_norm.weight", hf + "ln_1.weight"),
            _copy(ours + "attn_norm.bias", hf + "ln_1.bias"),
            Rule(tuple(n + ".weight" for n in qkv), (hf + "attn.c_attn.weight",), "conv1d_qkv"),
            Rule(tuple(n + ".bias" for n in qkv), (hf + "attn.c_attn.bias",), "qkv_bias"),
            Rule((ours + "attn.o_proj.weight",), (hf + "attn.c_proj.weight",), "conv1d"),
            _copy(ours + "attn.o_proj.bias", hf + "attn.c_proj.bias"),
            _copy(ours + "ffn_norm.weight", hf + "ln_2.weight"),
            _copy(ours + "ffn_norm.bias", hf + "ln_2.bias"),
            Rule((ours + "ffn.up.weight",), (hf + "mlp.c_fc.weight",), "conv1d"),
            _copy(ours + "ffn.up.bias", hf + "mlp.c_fc.bias"),
            Rule((ours + "ffn.down.weight",), (hf + "mlp.c_proj.weight",), "conv1d"),
            _copy(ours + "ffn.down.bias", hf + "mlp.c_proj.bias"),
        ]
    rules += [
        _copy("head.norm.weight", "transformer.ln_f.weight"),
        _copy("head.norm.bias", "transformer.ln_f.bias"),
        _copy("head.proj.weight", "lm_head.weight"),
    ]
    return rules


def gpt2_hf_config(cfg: ModelConfig, specials: dict):
    from transformers import GPT2Config

    act = {"tanh": "gelu_new", "none": "gelu"}[cfg.gelu_approximate]
    return GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.max_seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layers,
        n_head=cfg.n_heads,
        n_inner=cfg.ffn_dim,
        activation_function=act,
        layer_norm_epsilon=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        architectures=["GPT2LMHeadModel"],
        **specials,
    )


# --------------------------------------------------------------------------------------------
# BERT (import only: our encoder is not exported)


def bert_config(c) -> ModelConfig:
    act = c.hidden_act
    _require(act in ("gelu", "gelu_new", "gelu_pytorch_tanh"), "hidden_act", f"{act!r}: supported are gelu, gelu_new")
    kind = _get(c, "position_embedding_type", "absolute") or "absolute"
    _require(kind == "absolute", "position_embedding_type", f"{kind!r}: only 'absolute' is supported")
    _require(not _get(c, "is_decoder", False), "is_decoder", "True is not supported (encoder only)")
    return ModelConfig(
        arch="encoder",
        vocab_size=c.vocab_size,
        d_model=c.hidden_size,
        n_layers=c.num_hidden_layers,
        n_heads=c.num_attention_heads,
        n_kv_heads=None,
        d_ff=c.intermediate_size,
        max_seq_len=c.max_position_embeddings,
        positions="learned",
        norm="layernorm",
        norm_eps=float(c.layer_norm_eps),
        norm_position="post",
        ffn="gelu",
        gelu_approximate="none" if act == "gelu" else "tanh",
        bias=True,
        tie_embeddings=bool(_get(c, "tie_word_embeddings", True)),
    )


def bert_rules(cfg: ModelConfig, with_mlm_head: bool) -> list[Rule]:
    """Names as in ``BertModel``/``BertForMaskedLM`` with the ``bert.`` prefix removed."""
    rules = [
        _copy("embedding.tok.weight", "embeddings.word_embeddings.weight"),
        # Our embedding has no token-type table: every input here is segment 0, so BERT's
        # type-0 row is a constant added at every position and folds into the position table.
        Rule(("embedding.pos.weight",), ("embeddings.position_embeddings.weight", "embeddings.token_type_embeddings.weight"), "add_type0"),
        _copy("embedding.norm.weight", "embeddings.LayerNorm.weight"),
        _copy("embedding.norm.bias", "embeddings.LayerNorm.bias"),
    ]
    for i in range(cfg.n_layers):
        ours, hf = f"layers.{i}.", f"encoder.layer.{i}."
        pairs = [
            ("attn.q_proj", "attention.self.query"),
            ("attn.k_proj", "attention.self.key"),
            ("attn.v_proj", "attention.self.value"),
            ("attn.o_proj", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),  # post-norm after the attention residual
            ("ffn.up", "intermediate.dense"),
            ("ffn.down", "output.dense"),
            ("ffn_norm", "output.LayerNorm"),
        ]
        rules += [_copy(f"{ours}{a}.{p}", f"{hf}{b}.{p}") for a, b in pairs for p in ("weight", "bias")]
    if with_mlm_head:
        rules += [
            _copy("head.dense.weight", "cls.predictions.transform.dense.weight"),
            _copy("head.dense.bias", "cls.predictions.transform.dense.bias"),
            _copy("head.norm.weight", "cls.predictions.transform.LayerNorm.weight"),
            _copy("head.norm.bias", "cls.predictions.transform.LayerNorm.bias"),
            _copy("head.proj.weight", "cls.predictions.decoder.weight"),
            _copy("head.proj.bias", "cls.predictions.decoder.bias"),
        ]
    return rules


# --------------------------------------------------------------------------------------------
# Registry and the two directions


@dataclass(frozen=True)
class Family:
    model_type: str
    to_config: Any  # hf config -> ModelConfig
    hf_class: str  # transformers class that loads the checkpoint


FAMILIES = {
    "llama": Family("llama", llama_config, "AutoModelForCausalLM"),
    "gpt2": Family("gpt2", gpt2_config, "AutoModelForCausalLM"),
    "bert": Family("bert", bert_config, "BertModel"),  # BertForMaskedLM when architectures says so
}


def family_for(hf_config) -> Family:
    model_type = _get(hf_config, "model_type", None)
    _require(
        model_type in FAMILIES,
        "model_type",
        f"{model_type!r} is not supported (supported: {', '.join(sorted(FAMILIES))})",
    )
    return FAMILIES[model_type]


def rules_for(model_type: str, cfg: ModelConfig, hf_names: Optional[set] = None) -> list[Rule]:
    if model_type == "llama":
        return llama_rules(cfg)
    if model_type == "gpt2":
        return gpt2_rules(cfg)
    return bert_rules(cfg, with_mlm_head=hf_names is not None and "cls.predictions.transform.dense.weight" in hf_names)


def to_ours(rules: list[Rule], hf_state: dict) -> dict:
    """Our state dict (fp32) from Hugging Face tensors; tied lm_head may be absent (falls back)."""
    out = {}
    for rule in rules:
        missing = [n for n in rule.hf if n not in hf_state]
        if missing:
            if rule.ours == ("head.proj.weight",):
                continue  # tied head: filled from the embedding by the caller
            raise InteropError(f"weights: checkpoint has no tensor {missing[0]!r}")
        src = [hf_state[n].float() for n in rule.hf]
        if rule.kind == "copy":
            vals = [src[0]]
        elif rule.kind == "conv1d":
            vals = [src[0].t()]
        elif rule.kind == "conv1d_qkv":
            vals = list(src[0].t().chunk(3, dim=0))  # (3d, d) -> 3 x (d, d)
        elif rule.kind == "qkv_bias":
            vals = list(src[0].chunk(3, dim=0))
        elif rule.kind == "add_type0":
            vals = [src[0] + src[1][0]]  # (P, d) + (d,)
        else:
            raise AssertionError(rule.kind)
        out.update({name: v.contiguous() for name, v in zip(rule.ours, vals)})
    return out


def to_hf(rules: list[Rule], state: dict) -> dict:
    """Hugging Face tensors from our state dict (decoders: ``copy``/``conv1d`` kinds)."""
    import torch

    out = {}
    for rule in rules:
        src = [state[n].float() for n in rule.ours]
        if rule.kind == "copy":
            val = src[0]
        elif rule.kind == "conv1d":
            val = src[0].t()
        elif rule.kind == "conv1d_qkv":
            val = torch.cat(src, dim=0).t()  # 3 x (d, d) -> (d, 3d)
        elif rule.kind == "qkv_bias":
            val = torch.cat(src, dim=0)
        else:
            raise InteropError(f"export: {rule.kind} has no inverse")
        out[rule.hf[0]] = val.contiguous()
    return out
