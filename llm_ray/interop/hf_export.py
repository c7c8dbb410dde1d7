"""Export a loaded llm_ray decoder (a ``ModelBundle``) to Hugging Face format: ``export(bundle, out_dir)``.

rope + rmsnorm + swiglu decoders become ``LlamaForCausalLM``; learned positions + layernorm +
gelu (with biases, MHA) become ``GPT2LMHeadModel``. Shapes with no transformers equivalent
(MoE, sinusoidal positions, post-norm decoders, mixed shapes) are refused, naming the field.
transformers builds and saves the model (``save_pretrained``: config.json, model.safetensors)
and the tokenizer (``PreTrainedTokenizerFast.save_pretrained``); by default the folder is then
loaded back with ``AutoModelForCausalLM``/``AutoTokenizer`` and compared with our model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import torch

from llm_ray.config import ModelConfig
from llm_ray.interop.families import InteropError, gpt2_hf_config, llama_hf_config, rules_for, to_hf
from llm_ray.interop.hf_import import SAMPLE_TEXT


def _require(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise InteropError(f"{key}: {message}")


def hf_layout(cfg: ModelConfig) -> str:
    """``llama`` or ``gpt2``: the transformers architecture that computes exactly what ``cfg`` does."""
    _require(cfg.arch == "decoder", "model.arch", f"{cfg.arch!r}: only decoders export to a transformers causal LM")
    _require(not cfg.moe.enabled, "model.moe.num_experts", "mixture-of-experts decoders have no Llama/GPT-2 equivalent")
    _require(cfg.norm_position == "pre", "model.norm_position", "post-norm decoders have no Llama/GPT-2 equivalent")
    _require(cfg.positions != "sinusoidal", "model.positions", "sinusoidal positions have no Llama/GPT-2 equivalent")
    if cfg.positions == "rope":  # Llama
        _require(cfg.norm == "rmsnorm", "model.norm", f"{cfg.norm!r}: rope decoders export as Llama, which uses rmsnorm")
        _require(cfg.ffn == "swiglu", "model.ffn", f"{cfg.ffn!r}: rope decoders export as Llama, which uses swiglu")
        return "llama"
    # learned positions: GPT-2
    _require(cfg.norm == "layernorm", "model.norm", f"{cfg.norm!r}: learned-position decoders export as GPT-2 (layernorm)")
    _require(cfg.ffn == "gelu", "model.ffn", f"{cfg.ffn!r}: learned-position decoders export as GPT-2 (gelu)")
    _require(cfg.bias, "model.bias", "false: GPT-2 has biases in every linear and norm")
    _require(cfg.kv_heads == cfg.n_heads, "model.n_kv_heads", "GPT-2 has no grouped k/v heads (needs n_kv_heads = n_heads)")
    _require(cfg.n_heads * cfg.head_dim == cfg.d_model, "model.d_head", "GPT-2 needs n_heads x head size = d_model (heads pruned?)")
    return "gpt2"


def _special_tokens(bundle) -> tuple[dict, dict]:
    """(token strings for the tokenizer, token ids for the model config)."""
    tok = bundle.tokenizer
    ids = {"bos": bundle.bos_id, "eos": bundle.eos_ids[0] if bundle.eos_ids else None, "pad": bundle.pad_id}
    names = {f"{role}_token": tok.id_to_token(i) for role, i in ids.items() if i is not None}
    return names, {f"{role}_token_id": i for role, i in ids.items()}


@torch.no_grad()
def verify_export(bundle, out_dir: str) -> dict:
    """Load the exported folder with transformers; compare logits and tokenization with ours."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(out_dir)
    ours_ids = bundle.tokenizer.encode(SAMPLE_TEXT).ids[: bundle.cfg.max_seq_len]
    input_ids = torch.tensor([ours_ids])  # (1, T)
    diff = (hf_model(input_ids=input_ids).logits - bundle.model(input_ids)).abs().max().item()
    return {
        "max_abs_logit_diff": diff,
        "tokenizer_ids_equal": hf_tok(SAMPLE_TEXT)["input_ids"][: len(ours_ids)] == ours_ids,
    }


def export(bundle, out_dir: str, verify: bool = True) -> dict:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer files, summary.json).

    ``bundle``: a loaded model folder (``llm_ray.bundle.ModelBundle`` or anything with its
    ``model``, ``cfg``, ``tokenizer``, ``chat_template``, ``bos_id``, ``eos_ids``, ``pad_id``, ``path``).
    """
    import transformers

    from llm_ray.models import count_params

    cfg = bundle.cfg
    layout = hf_layout(cfg)
    token_names, token_ids = _special_tokens(bundle)
    if layout == "llama":
        hf_config, cls = llama_hf_config(cfg, token_ids), transformers.LlamaForCausalLM
    else:
        hf_config, cls = gpt2_hf_config(cfg, token_ids), transformers.GPT2LMHeadModel
    hf_model = cls(hf_config).eval()
    state = to_hf(rules_for(layout, cfg), bundle.model.state_dict())
    hf_model.load_state_dict(state, strict=True)

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bundle.tokenizer, **token_names)
    if bundle.chat_template:
        hf_tok.chat_template = bundle.chat_template

    os.makedirs(out_dir, exist_ok=True)
    # Staged next to the output, then moved in with config.json last: a folder that has a
    # config.json has the weights it names.
    staging = tempfile.mkdtemp(prefix=".export-hf-", dir=out_dir)
    try:
        hf_model.save_pretrained(staging)
        hf_tok.save_pretrained(staging)
        names = sorted(os.listdir(staging), key=lambda n: n == "config.json")
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    summary = {
        "out_dir": os.path.abspath(out_dir),
        "source": bundle.path,
        "architecture": cls.__name__,
        "params": count_params(bundle.model),
        "bytes": os.path.getsize(os.path.join(out_dir, "model.safetensors")),
    }
    if verify:
        summary.update(verify_export(bundle, out_dir))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
