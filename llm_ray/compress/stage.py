"""``llm-ray compress SPEC --out DIR``: apply one method to a model folder, write the result as
a model folder with ``summary.json`` — the original's and the compressed folder's figures side
by side, and their ratios."""

from __future__ import annotations

import json
import os
import time

from llm_ray.stage import StageResult, write_summary


def compressed_folder(original, spec, out_dir: str) -> str:
    """Write ``original`` (a loaded ModelBundle) compressed by ``spec.method`` into ``out_dir``."""
    from llm_ray.bundle import save_bundle
    from llm_ray.bundle.folder import TOKENIZER_CONFIG

    tok_config = None
    path = os.path.join(original.path, TOKENIZER_CONFIG)
    if os.path.exists(path):
        with open(path) as f:
            tok_config = json.load(f)
    kept = {k: v for k, v in original.config.items() if k not in ("format", "model", "quantization", "compression")}
    provenance = {**kept, "compression": {"method": spec.method, "from": original.path}}
    if spec.method == "prune_ffn":
        provenance["compression"]["sparsity"] = spec.sparsity
        model, cfg = pruned_ffn(original, spec)
        return save_bundle(model, cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config)
    provenance["compression"]["group_size"] = spec.group_size
    return save_bundle(original.model, original.cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config,
                       quantization={"scheme": spec.method, "group_size": spec.group_size})


def pruned_ffn(original, spec):
    """(model, config) with ``spec.sparsity`` of every layer's FFN channels removed."""
    from llm_ray.compress.prune import calibration_ids, ffn_channel_scores, prune_ffn_channels

    calibration = None
    if spec.calibration_text:
        calibration = calibration_ids(original.tokenizer, spec.calibration_text, spec.calibration_tokens,
                                      min(spec.window, original.cfg.max_seq_len))
    keep = original.cfg.ffn_dim - round(spec.sparsity * original.cfg.ffn_dim)
    model, cfg, _ = prune_ffn_channels(original.model, original.cfg, max(1, keep), ffn_channel_scores(original.model, calibration))
    return model, cfg


def ratios(before: dict, after: dict) -> dict:
    """Same-run ratios: how many times smaller, perplexity and speed after over before."""
    out = {"size_ratio": before["bytes"] / after["bytes"], "perplexity_ratio": after["perplexity"] / before["perplexity"]}
    for key in before:
        if key.startswith("tokens_per_s_"):
            out[f"{key}_ratio"] = after[key] / before[key]
    return {k: round(v, 4) for k, v in out.items()}


def compress_stage(spec, out_dir: str) -> StageResult:
    from llm_ray.bundle import load_bundle
    from llm_ray.compress.measure import measure

    from llm_ray.bundle.folder import resolve_model_path
    from llm_ray.config import RecipeError

    started = time.time()
    for key in ("eval_text", "calibration_text"):
        if getattr(spec, key) and not os.path.isfile(getattr(spec, key)):
            raise RecipeError(key, f"{getattr(spec, key)} is not a file")
    try:
        resolve_model_path(spec.model)
    except FileNotFoundError as e:
        raise RecipeError("model", str(e)) from None
    original = load_bundle(spec.model)
    if spec.method == "prune_ffn" and original.cfg.moe.enabled:
        raise RecipeError("method", "prune_ffn needs dense FFNs; this model has mixture-of-experts layers")
    before = measure(original, spec)
    folder = compressed_folder(original, spec, out_dir)
    compressed = load_bundle(folder)
    after = measure(compressed, spec)
    meta = compressed.config.get("quantization", {})
    summary = {
        "out_dir": folder,
        "model": original.path,
        "method": spec.method,
        "group_size": spec.group_size if spec.method == "int4" else None,
        "d_ff": [original.cfg.ffn_dim, compressed.cfg.ffn_dim],
        "tensors_compressed": len(meta.get("tensors", [])),
        "eval_text": os.path.abspath(spec.eval_text),
        "before": before,
        "after": after,
        **ratios(before, after),
        # load_bundle dequantizes into float weights: the bytes fall on disk, not in memory or
        # in decode time (torchao's int8 kernels were measured slower than fp32 on these CPUs)
        "runtime": "dequantized to fp32 at load" if meta else "fp32",
        "wall_s": round(time.time() - started, 2),
    }
    return write_summary(folder, summary)
