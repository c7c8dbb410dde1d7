"""Sequence classification on top of our decoder or encoder, and its on-disk form.

``SequenceClassifier`` pools one vector per sequence (decoder: the last real token, which has
seen the whole text under causal attention; encoder: [CLS] or the mean of real tokens) and
projects it to ``num_labels`` logits. Its ``forward`` returns ``(B, 1, C)`` so that the training
engine's token cross entropy (``parallelize.lm_loss``) is exactly the classification loss with
labels ``(B, 1)``: the same loop trains language models and classifiers.

Inputs are right-padded with ``pad_id``; only the trailing run of pads counts as padding, so a
pad id that also appears inside a text (some tokenizers pad with EOS) does not cut it short.

On disk a classifier is a normal model folder (``save_bundle``: the backbone, loadable alone)
plus ``classifier.safetensors`` (the head) and ``classifier.json`` (labels, pooling, pad id).
"""

from __future__ import annotations

import json
import os
from typing import Literal, Optional

import torch
import torch.nn as nn

HEAD_WEIGHTS = "classifier.safetensors"
HEAD_CONFIG = "classifier.json"
Pooling = Literal["auto", "last", "cls", "mean"]


def real_token_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) bool, False on the trailing pads of each right-padded row."""
    is_pad = input_ids == pad_id
    trailing = torch.flip(torch.cumprod(torch.flip(is_pad, [1]).int(), dim=1), [1]).bool()
    return ~trailing


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_labels: int, pad_id: int, pooling: Pooling = "auto"):
        super().__init__()
        if num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 labels, got {num_labels}")
        self.backbone = backbone
        self.arch = backbone.cfg.arch
        if pooling == "auto":
            pooling = "last" if self.arch == "decoder" else "cls"
        if self.arch == "decoder" and pooling == "cls":
            raise ValueError("pooling 'cls' needs an encoder: a causal decoder's first token sees only itself")
        self.pooling, self.pad_id, self.num_labels = pooling, pad_id, num_labels
        d = backbone.cfg.d_model
        self.classifier = nn.Linear(d, num_labels)
        nn.init.normal_(self.classifier.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.classifier.bias)

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, d)."""
        b = self.backbone
        if self.arch == "encoder":
            return b.encode(input_ids, mask)
        # Decoder, right padding: real tokens never attend to the pads after them, so no mask
        # is needed and SDPA keeps its causal fast path; positions 0..T-1 are the right ones.
        x = b.embedding(input_ids)  # (B, T, d)
        for layer in b.layers:
            x = layer(x)
        return b.head.norm(x)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, d)."""
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            return (x * m).sum(1) / m.sum(1).clamp(min=1)
        last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,) index of the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]

    def classify(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) right-padded -> logits (B, C)."""
        mask = real_token_mask(input_ids, self.pad_id)
        pooled = self.pool(self.hidden_states(input_ids, mask), mask)
        return self.classifier(pooled.to(self.classifier.weight.dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.classify(input_ids).unsqueeze(1)  # (B, 1, C): one "token" per sequence

    def aux_loss(self) -> torch.Tensor:
        return self.backbone.aux_loss()


def save_classifier(
    model: SequenceClassifier,
    labels: list[str],
    tokenizer_json: str,
    out_dir: str,
    provenance: Optional[dict] = None,
    tokenizer_config: Optional[dict] = None,
) -> str:
    from safetensors.torch import save_file

    from llm_ray.models.bundle import save_bundle

    save_bundle(model.backbone, model.backbone.cfg, tokenizer_json, out_dir, provenance, tokenizer_config)
    head = {k: v.detach().float().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, os.path.join(out_dir, HEAD_WEIGHTS))
    with open(os.path.join(out_dir, HEAD_CONFIG), "w") as f:
        json.dump({"labels": labels, "pooling": model.pooling, "pad_id": model.pad_id}, f, indent=2)
    return os.path.abspath(out_dir)


def load_classifier(path: str, device: str = "cpu") -> tuple[SequenceClassifier, list[str], "object"]:
    """(classifier in eval mode, label names, tokenizer) from a folder ``save_classifier`` wrote."""
    from safetensors.torch import load_file

    from llm_ray.models.bundle import load_bundle

    with open(os.path.join(path, HEAD_CONFIG)) as f:
        spec = json.load(f)
    bundle = load_bundle(path, device=device)
    model = SequenceClassifier(bundle.model, len(spec["labels"]), spec["pad_id"], spec["pooling"])
    model.classifier.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS), device=str(device)), strict=True)
    return model.to(device).eval(), spec["labels"], bundle.tokenizer
