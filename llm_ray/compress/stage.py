"""``llm-ray compress SPEC --out DIR``: apply one method to a model folder, write the result as
a model folder with ``summary.json`` — the original's and the compressed folder's figures side
by side, and their ratios."""

from __future__ import annotations

import json
import os
import time

from llm_ray.config.compress import UNSTRUCTURED
from llm_ray.stage import StageResult, write_summary


def compressed_folder(original, spec, out_dir: str) -> tuple[str, dict]:
    """Write ``original`` (a loaded ModelBundle) compressed by ``spec.method`` into ``out_dir``;
    (the folder, what the method adds to the summary)."""
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
        return save_bundle(model, cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config), {}
    if spec.method == "prune_heads":
        provenance["compression"].update(sparsity=spec.sparsity, head_unit=spec.head_unit)
        model, cfg = pruned_heads(original, spec)
        return save_bundle(model, cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config), {}
    if spec.method in ("distill", "qat"):
        from llm_ray.compress.distill import distilled_folder, qat_folder

        folder, training = (distilled_folder if spec.method == "distill" else qat_folder)(original, spec, out_dir)
        return folder, {"training": training}
    if spec.method in UNSTRUCTURED:
        model, shares = sparse_copy(original, spec)
        provenance["compression"].update(sparsity=spec.sparsity, n_m=spec.n_m or None, zeroed_share=shares)
        return save_bundle(model, original.cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config), {}
    provenance["compression"]["group_size"] = spec.group_size
    quantization = {"scheme": spec.method, "group_size": spec.group_size}
    if spec.method == "int8_dynamic":  # the int8 folder; its loader quantizes activations too
        quantization = {"scheme": "int8", "group_size": spec.group_size, "activations": "int8_dynamic"}
    return save_bundle(original.model, original.cfg, original.tokenizer.to_str(), out_dir, provenance, tok_config,
                       quantization=quantization), {}


def _calibration(original, spec):
    """(N, T) calibration token ids from ``calibration_text`` or ``calibration_shards``, or None."""
    from llm_ray.compress.prune import calibration_ids, shard_calibration_ids

    width = min(spec.window, original.cfg.max_seq_len)
    if spec.calibration_shards:
        from llm_ray.storage import resolve_storage

        dataset = resolve_storage(spec.calibration_shards, spec.s3_endpoint or None)
        return shard_calibration_ids(dataset, original.tokenizer, spec.calibration_tokens, width)
    if not spec.calibration_text:
        return None
    return calibration_ids(original.tokenizer, spec.calibration_text, spec.calibration_tokens, width)


def sparse_copy(original, spec):
    """(a copy of the model with ``spec.method``'s unstructured zeros, the share zeroed in the
    pruned matrices: the embedding and LM head stay dense, so the whole model's is lower)."""
    from llm_ray.bundle import load_bundle
    from llm_ray.compress.prune import layer_linears, prune_unstructured

    model = load_bundle(original.path).model  # a fresh copy: the original is measured as it was
    shares = prune_unstructured(model, spec.method, spec.sparsity, _calibration(original, spec), tuple(spec.n_m) or None)
    sizes = {n: m.weight.numel() for n, m in layer_linears(model).items()}
    return model, round(sum(shares[n] * sizes[n] for n in sizes) / sum(sizes.values()), 4)


def pruned_ffn(original, spec):
    """(model, config) with ``spec.sparsity`` of every layer's FFN channels removed."""
    from llm_ray.compress.prune import ffn_channel_scores, prune_ffn_channels

    calibration = _calibration(original, spec)
    keep = original.cfg.ffn_dim - round(spec.sparsity * original.cfg.ffn_dim)
    model, cfg, _ = prune_ffn_channels(original.model, original.cfg, max(1, keep), ffn_channel_scores(original.model, calibration))
    return model, cfg


def pruned_heads(original, spec):
    """(model, config) with ``spec.sparsity`` of every layer's heads (or k/v groups) removed."""
    from llm_ray.compress.heads import head_plan, head_scores, prune_heads

    remove = head_plan(original.cfg, spec.sparsity, spec.head_unit)  # checked in compress_stage
    scores = head_scores(original.model, original.cfg, _calibration(original, spec))
    model, cfg, _ = prune_heads(original.model, original.cfg, remove, spec.head_unit, scores)
    return model, cfg


def runtime_of(meta: dict) -> str:
    if meta.get("activations") == "int8_dynamic":
        return "int8 weights and per-token int8 activations: int8 matmuls"
    return "dequantized to fp32 at load" if meta else "fp32"


def ratios(before: dict, after: dict) -> dict:
    """Same-run ratios: how many times smaller, perplexity and speed after over before."""
    out = {"size_ratio": before["bytes"] / after["bytes"], "perplexity_ratio": after["perplexity"] / before["perplexity"]}
    for key in before:
        if key.startswith("tokens_per_s_"):
            out[f"{key}_ratio"] = after[key] / before[key]
    return {k: round(v, 4) for k, v in out.items()}


def check_against_model(original, spec) -> None:
    """What the spec asks that this model cannot take, refused naming the key before anything
    is measured (as a missing text file is)."""
    from llm_ray.config import RecipeError

    if spec.method == "prune_ffn" and original.cfg.moe.enabled:
        raise RecipeError("method", "prune_ffn needs dense FFNs; this model has mixture-of-experts layers")
    if spec.calibration_shards:
        from llm_ray.compress.prune import check_calibration_shards
        from llm_ray.storage import resolve_storage

        try:
            check_calibration_shards(resolve_storage(spec.calibration_shards, spec.s3_endpoint or None), original.tokenizer)
        except (ValueError, OSError) as e:
            raise RecipeError("calibration_shards", str(e)) from None
    if spec.method == "distill":
        from llm_ray.compress.distill import student_config

        if student_config(original.cfg, spec).d_model != original.cfg.d_model:  # also validates the shape
            if spec.student_init == "teacher_layers":
                raise RecipeError("student_init", "a narrower student (student_width) cannot start from the teacher's layers: use random")
            if spec.hidden_cosine:
                raise RecipeError("hidden_cosine", "compares hidden states of equal width; the student is narrower")
    if spec.method == "prune_heads":
        from llm_ray.compress.heads import head_plan

        try:
            head_plan(original.cfg, spec.sparsity, spec.head_unit)
        except ValueError as e:
            raise RecipeError("sparsity", str(e)) from None


def compress_stage(spec, out_dir: str) -> StageResult:
    from llm_ray.bundle import load_bundle
    from llm_ray.bundle.folder import resolve_model_path
    from llm_ray.compress.measure import measure
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
    check_against_model(original, spec)
    before = measure(original, spec)
    folder, extra = compressed_folder(original, spec, out_dir)
    compressed = load_bundle(folder)
    after = measure(compressed, spec)
    meta = compressed.config.get("quantization", {})
    summary = {
        "out_dir": folder,
        "model": original.path,
        "method": spec.method,
        "group_size": spec.group_size if spec.method == "int4" or (spec.method, spec.qat_scheme) == ("qat", "int4") else None,
        "d_ff": [original.cfg.ffn_dim, compressed.cfg.ffn_dim],
        "n_layers": [original.cfg.n_layers, compressed.cfg.n_layers],
        "n_heads": [original.cfg.n_heads, compressed.cfg.n_heads],
        "n_kv_heads": [original.cfg.kv_heads, compressed.cfg.kv_heads],
        "sparsity": 1 - after["nonzeros"] / after["params"],
        "tensors_compressed": len(meta.get("tensors", [])),
        "eval_text": os.path.abspath(spec.eval_text),
        "before": before,
        "after": after,
        **ratios(before, after),
        # load_bundle dequantizes into float weights (the bytes fall on disk, not in memory or
        # in decode time: torchao's int8 kernels were measured slower than fp32 on these CPUs),
        # except int8_dynamic, whose linears run int8 matmuls (torch._int_mm)
        "runtime": runtime_of(meta),
        **extra,
        "wall_s": round(time.time() - started, 2),
    }
    return write_summary(folder, summary)
