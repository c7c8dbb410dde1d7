"""A classifier's or reward model's on-disk form: a normal model folder (``save_bundle``: the
backbone, loadable alone) plus ``classifier.safetensors`` (the head) and ``classifier.json``
(kind, labels, pooling, pad id). A reward model is a one-output head of kind ``reward``.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from llm_ray.bundle.folder import load_bundle, save_bundle
from llm_ray.models.heads import RewardModel, SequenceClassifier

HEAD_WEIGHTS = "classifier.safetensors"
HEAD_CONFIG = "classifier.json"


def save_classifier(
    model: SequenceClassifier,
    labels: list[str],
    tokenizer_json: str,
    out_dir: str,
    provenance: Optional[dict] = None,
    tokenizer_config: Optional[dict] = None,
) -> str:
    from safetensors.torch import save_file

    save_bundle(model.backbone, model.backbone.cfg, tokenizer_json, out_dir, provenance, tokenizer_config)
    head = {k: v.detach().float().contiguous() for k, v in model.classifier.state_dict().items()}
    save_file(head, os.path.join(out_dir, HEAD_WEIGHTS))
    with open(os.path.join(out_dir, HEAD_CONFIG), "w") as f:
        kind = "reward" if isinstance(model, RewardModel) else "classifier"
        json.dump({"kind": kind, "labels": labels, "pooling": model.pooling, "pad_id": model.pad_id}, f, indent=2)
    return os.path.abspath(out_dir)


def load_classifier(path: str, device: str = "cpu") -> tuple[SequenceClassifier, list[str], "object"]:
    """(classifier in eval mode, label names, tokenizer) from a folder ``save_classifier`` wrote."""
    from safetensors.torch import load_file

    with open(os.path.join(path, HEAD_CONFIG)) as f:
        spec = json.load(f)
    bundle = load_bundle(path, device=device)
    if spec.get("kind") == "reward":
        model = RewardModel(bundle.model, spec["pad_id"], spec["pooling"])
    else:
        model = SequenceClassifier(bundle.model, len(spec["labels"]), spec["pad_id"], spec["pooling"])
    model.classifier.load_state_dict(load_file(os.path.join(path, HEAD_WEIGHTS), device=str(device)), strict=True)
    return model.to(device).eval(), spec["labels"], bundle.tokenizer
