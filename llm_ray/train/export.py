"""Consolidate a DeepSpeed checkpoint into one model folder for the later stages.

Output: ``model.safetensors`` (fp32), ``config.json`` (our ModelConfig), ``tokenizer.json`` and
``summary.json``. The weights are loaded into a freshly built model with ``strict=True`` before
they are written, so a folder that exists is one that loads.
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import tempfile
from typing import Optional

import torch

from llm_ray.bundle import WEIGHTS, load_bundle, save_bundle
from llm_ray.config import ModelConfig, from_dict
from llm_ray.stage import StageResult, write_summary
from llm_ray.storage import Storage, resolve_storage
from llm_ray.train.checkpointing import MANIFEST, decrypted_checkpoint, latest_complete_checkpoint


def _locate(uri: str, s3_endpoint: Optional[str]) -> tuple[Storage, Storage]:
    """(run folder, checkpoint folder) for a run folder or one of its checkpoint folders."""
    target = resolve_storage(uri.rstrip("/"), s3_endpoint)
    if posixpath.basename(target.root).startswith("checkpoint_"):
        run = resolve_storage(posixpath.dirname(target.uri), s3_endpoint)
        if not target.exists("COMPLETE"):
            raise FileNotFoundError(f"{target.uri} is not a complete checkpoint (no COMPLETE marker)")
        return run, target
    ckpt = latest_complete_checkpoint(target)
    if ckpt is None:
        raise FileNotFoundError(f"no complete checkpoint under {target.uri}")
    return target, ckpt


def _pipeline_state_dict(folder: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map DeepSpeed pipeline layer files (layer_XX-model_states.pt) to DecoderLM names.

    Layer order comes from ``parallelize.pipeline_layers``: 0 embedding, 1..L blocks, then the
    head (untied) or the final norm plus the tied embedding again (skipped: same weight).
    """
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        m = re.fullmatch(r"layer_(\d+)-model_states\.pt", name)
        if not m:
            continue
        idx = int(m.group(1))
        if idx == 0:
            prefix = "embedding."
        elif idx <= cfg.n_layers:
            prefix = f"layers.{idx - 1}."
        elif idx == cfg.n_layers + 1:
            prefix = "head."
        else:
            continue
        for key, value in torch.load(os.path.join(folder, name), map_location="cpu", weights_only=False).items():
            out[prefix + key] = value
    return out


def checkpoint_state_dict(local_dir: str, manifest: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint folder (any ZeRO stage, pipeline or not)."""
    folder = os.path.join(local_dir, manifest["tag"])
    if any(n.startswith("layer_") for n in os.listdir(folder)):
        state = _pipeline_state_dict(folder, cfg)
    elif any("zero_pp_rank" in n and "optim_states" in n for n in os.listdir(folder)):
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # ZeRO 1-3: the fp32 master weights live partitioned in the optimizer states.
        state = get_fp32_state_dict_from_zero_checkpoint(local_dir, tag=manifest["tag"])
    else:
        states = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
        state = states["module"]
    state = {k: v.float() for k, v in state.items()}
    if cfg.tie_embeddings and cfg.arch == "decoder" and "embedding.tok.weight" in state:  # absent: sft-wrapped model
        state.setdefault("head.proj.weight", state["embedding.tok.weight"])
    return state


def load_checkpoint_state(uri: str, s3_endpoint: Optional[str] = None) -> tuple[dict[str, torch.Tensor], dict, Storage, Storage]:
    """(fp32 state dict, manifest, run folder, checkpoint folder) of a run's latest COMPLETE
    checkpoint (or of the checkpoint folder ``uri`` names)."""
    run, ckpt = _locate(uri, s3_endpoint)
    with tempfile.TemporaryDirectory(prefix="llm-ray-export-") as tmp:
        if ckpt.is_local:
            local = ckpt.root
        else:
            local = os.path.join(tmp, "ckpt")
            run.download_dir(posixpath.basename(ckpt.root), local)
        with open(os.path.join(local, MANIFEST)) as f:
            manifest = json.load(f)
        local = decrypted_checkpoint(local, manifest, os.path.join(tmp, "plain"))
        cfg = from_dict(ModelConfig, manifest["model"])
        state = checkpoint_state_dict(local, manifest, cfg)
    return state, manifest, run, ckpt


def export_model(uri: str, out_dir: str, s3_endpoint: Optional[str] = None, encrypt: bool = False) -> StageResult:
    """The run's latest complete checkpoint (decrypted if it is encrypted) as a model folder,
    its weights and tokenizer encrypted too with ``encrypt``."""
    from llm_ray.models import build_model, count_params

    state, manifest, run, ckpt = load_checkpoint_state(uri, s3_endpoint)
    cfg = from_dict(ModelConfig, manifest["model"])
    model = build_model(cfg)
    model.load_state_dict(state, strict=True)
    provenance = {
        "tokenizer_hash": manifest["tokenizer_hash"],
        "source_checkpoint": ckpt.uri,
        "step": manifest["train_state"]["step"],
    }
    save_bundle(model, cfg, run.read_text("tokenizer.json"), out_dir, provenance, encrypt=encrypt)
    summary = {
        "out_dir": os.path.abspath(out_dir),
        "source_checkpoint": ckpt.uri,
        "step": provenance["step"],
        "params": count_params(model),
        "bytes": os.path.getsize(os.path.join(out_dir, WEIGHTS)),
    }
    return write_summary(summary["out_dir"], summary)


def load_exported(path: str, device: str = "cpu"):
    """(model in eval mode, tokenizer, ModelConfig) from a model folder (see llm_ray/bundle/folder.py)."""
    bundle = load_bundle(path, device=device)
    return bundle.model, bundle.tokenizer, bundle.cfg
