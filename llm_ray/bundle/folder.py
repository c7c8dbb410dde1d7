"""A model folder: the one on-disk form every later stage reads (generate, eval, sft, serve).

Layout (written by ``llm-ray export``, ``llm-ray import`` and ``llm-ray sft``)::

    config.json          {"format": "llm_ray", "model": {ModelConfig fields}, ...provenance}
    model.safetensors    fp32 weights of ``build_model(cfg)`` (tied weights stored once), or
                         int8/int4 matrices with their scales when config.json has "quantization"
    tokenizer.json       Hugging Face ``tokenizers`` file
    tokenizer_config.json  optional, Hugging Face style: chat_template, bos/eos/pad tokens

``load_bundle`` also accepts a short name of a model shipped in a Python package (``smollm2``,
``minilm``), converted once into a cache folder (``llm_ray.bundle.packaged``).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from llm_ray.config import ModelConfig, from_dict
from llm_ray.encryption import read_maybe_encrypted

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class ModelBundle:
    """A loaded model folder: the module (eval mode), its tokenizer and what generation needs."""

    model: nn.Module
    tokenizer: "object"  # tokenizers.Tokenizer (kept untyped: no import at module load)
    cfg: ModelConfig
    path: str
    config: dict  # the whole config.json (provenance fields included)
    chat_template: Optional[str] = None
    bos_id: Optional[int] = None
    eos_ids: list[int] = field(default_factory=list)  # any of these ends a generation
    pad_id: Optional[int] = None


def _token_id(tokenizer, token) -> Optional[int]:
    """Id of a token given as a string or as Hugging Face's {"content": ...} dict."""
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if token else None


def _special_tokens(tokenizer, tok_config: dict) -> tuple[Optional[int], list[int], Optional[int]]:
    """(bos, eos list, pad) from tokenizer_config.json, else from the tokenizer's own specials."""
    from llm_ray.data.tokenizer import special_ids

    specials = special_ids(tokenizer)
    bos = _token_id(tokenizer, tok_config.get("bos_token"))
    eos = _token_id(tokenizer, tok_config.get("eos_token"))
    pad = _token_id(tokenizer, tok_config.get("pad_token"))
    eos_ids = [eos] if eos is not None else ([specials.eos_id] if specials.eos_id is not None else [])
    return bos, eos_ids, pad if pad is not None else specials.pad_id


def resolve_model_path(name_or_path: str) -> str:
    """A folder path for a folder or a packaged model's short name (converted on first use)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    # Imported here: the packaged-model cache writes its folders with save_bundle (below).
    from llm_ray.bundle.packaged import PACKAGES, packaged_model

    if name_or_path in PACKAGES:
        return packaged_model(name_or_path)
    raise FileNotFoundError(
        f"model {name_or_path!r}: not a folder and not a packaged model ({', '.join(sorted(PACKAGES)) or 'none'})"
    )


def load_bundle(name_or_path: str, device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None,
                float_weights: bool = False) -> ModelBundle:
    """Load a model folder (or packaged model) with ``strict=True``, in eval mode.
    ``float_weights``: plain float linears even for an int8_dynamic folder (export, training)."""
    from safetensors.torch import load_model
    from tokenizers import Tokenizer

    from llm_ray.models import build_model

    path = resolve_model_path(name_or_path)
    with open(os.path.join(path, CONFIG)) as f:
        config = json.load(f)
    cfg = from_dict(ModelConfig, config["model"])
    model = build_model(cfg)
    sealed = bool(config.get("encryption"))  # decrypted in memory, every file authenticated
    if "quantization" in config:
        model.load_state_dict(_dequantized(os.path.join(path, WEIGHTS), config["quantization"], str(device), sealed), strict=True)
        if config["quantization"].get("activations") == "int8_dynamic" and not float_weights:
            from llm_ray.models.quant import apply_int8_dynamic

            model = apply_int8_dynamic(model)  # the int8 matmul runs the forward (inference only)
    elif sealed:
        from llm_ray.models.converters import load_weights_bytes

        load_weights_bytes(model, read_maybe_encrypted(os.path.join(path, WEIGHTS), WEIGHTS), str(device))
    else:
        load_model(model, os.path.join(path, WEIGHTS), strict=True, device=str(device))
    if dtype is not None:
        model = model.to(dtype)
    if sealed:
        tokenizer = Tokenizer.from_str(read_maybe_encrypted(os.path.join(path, TOKENIZER), TOKENIZER).decode("utf-8"))
    else:
        tokenizer = Tokenizer.from_file(os.path.join(path, TOKENIZER))
    tok_config = {}
    if os.path.exists(os.path.join(path, TOKENIZER_CONFIG)):
        with open(os.path.join(path, TOKENIZER_CONFIG)) as f:
            tok_config = json.load(f)
    bos, eos_ids, pad = _special_tokens(tokenizer, tok_config)
    return ModelBundle(
        model=model.eval(),
        tokenizer=tokenizer,
        cfg=cfg,
        path=os.path.abspath(path),
        config=config,
        chat_template=tok_config.get("chat_template"),
        bos_id=bos,
        eos_ids=eos_ids,
        pad_id=pad,
    )


def _dequantized(weights: str, meta: dict, device: str, sealed: bool = False) -> dict[str, torch.Tensor]:
    """The float state dict of a quantized folder's weights, tied names restored."""
    from safetensors.torch import load, load_file

    from llm_ray.models.quant import dequantize_state_dict

    stored = load(read_maybe_encrypted(weights, WEIGHTS)) if sealed else load_file(weights, device=device)
    state = dequantize_state_dict({k: v.to(device) for k, v in stored.items()}, meta["scheme"])
    for alias, kept in meta.get("tied", {}).items():
        state[alias] = state[kept]
    return state


def _seal(folder: str, names: tuple[str, ...]) -> dict:
    """Encrypt ``names`` in ``folder`` in place; config.json's ``encryption`` entry."""
    from llm_ray.encryption import encrypt_file, key_fingerprint, load_key

    key = load_key()
    for name in names:
        encrypt_file(os.path.join(folder, name), name, key)
    return {"scheme": "aes-256-gcm", "files": list(names), "key_fingerprint": key_fingerprint(key)}


def _save_quantized(model: nn.Module, path: str, quantization: dict) -> dict:
    """Store ``model``'s weights as integers (``models/quant.py``); returns config.json's
    ``quantization`` entry (scheme, group size, the quantized names, tied aliases)."""
    from safetensors.torch import save_file

    from llm_ray.models.quant import quantize_state_dict

    state, kept, tied = {}, {}, {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape))
        if key in kept:  # a tied weight (the embedding as the LM head): stored once
            tied[name] = kept[key]
        else:
            kept[key], state[name] = name, t.float()
    scheme, group = quantization["scheme"], int(quantization.get("group_size", 64))
    stored, names = quantize_state_dict(state, scheme, group)
    save_file(stored, path)
    meta = {"scheme": scheme, "group_size": group, "tensors": names, "tied": tied}
    if quantization.get("activations"):
        meta["activations"] = quantization["activations"]
    return meta


def save_bundle(
    model: nn.Module,
    cfg: ModelConfig,
    tokenizer_json: str,
    out_dir: str,
    provenance: Optional[dict] = None,
    tokenizer_config: Optional[dict] = None,
    quantization: Optional[dict] = None,
    encrypt: bool = False,
) -> str:
    """Write a model folder; every file appears whole or not at all (staged, then renamed).

    ``encrypt``: the weights and the tokenizer are stored AES-256-GCM encrypted with the key of
    ``LLM_RAY_ENCRYPTION_KEY(_FILE)`` (``llm_ray.encryption``); config.json says so (and the
    key's fingerprint), and ``load_bundle`` decrypts them in memory with the same key.

    ``tokenizer_json`` is the tokenizer file's text (``Tokenizer.to_str()``). ``quantization``
    (``{"scheme": "int8" | "int4", "group_size": 64}``) stores the matrices as integers with
    their scales; ``load_bundle`` reads such a folder back as a float model, or, with
    ``"activations": "int8_dynamic"`` (int8 only), with its linears running int8 matmuls.
    """
    import dataclasses

    from safetensors.torch import save_model

    os.makedirs(out_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".bundle-", dir=out_dir)
    try:
        model = model.float() if any(p.dtype != torch.float32 for p in model.parameters()) else model
        extra = {}
        if quantization:
            extra["quantization"] = _save_quantized(model, os.path.join(staging, WEIGHTS), quantization)
        else:
            save_model(model, os.path.join(staging, WEIGHTS))  # tied weights stored once
        os.chmod(os.path.join(staging, WEIGHTS), 0o644)  # safetensors writes 0600; a model folder is meant to be shared
        config = {"format": "llm_ray", "model": dataclasses.asdict(cfg), **(provenance or {}), **extra}
        files = {TOKENIZER: tokenizer_json}
        if tokenizer_config:
            files[TOKENIZER_CONFIG] = json.dumps(tokenizer_config, indent=2)
        for name, text in files.items():
            with open(os.path.join(staging, name), "w", encoding="utf-8") as f:
                f.write(text)
        if encrypt:
            config["encryption"] = _seal(staging, (WEIGHTS, TOKENIZER))
        with open(os.path.join(staging, CONFIG), "w", encoding="utf-8") as f:
            f.write(json.dumps(config, indent=2))
        # Weights first, config last: a folder with config.json has everything it names.
        for name in (WEIGHTS, TOKENIZER, *([TOKENIZER_CONFIG] if tokenizer_config else []), CONFIG):
            os.replace(os.path.join(staging, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return os.path.abspath(out_dir)
