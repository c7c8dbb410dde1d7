"""LoRA adapters (Hu et al. 2021) for any ``nn.Linear`` of our models, and their merge.

``apply_lora`` swaps targeted linears for ``LoRALinear`` in place: the original layer becomes
``.base`` (frozen) and the update is ``scale * B @ A`` with A (r, in) Kaiming-initialised and
B (out, r) zero, so a freshly wrapped model computes exactly what the base does. ``merge_lora``
folds ``W + scale * B @ A`` back into plain linears, so the exported folder is an ordinary model
that ``load_bundle`` reads with ``strict=True``. Pure torch: no Ray, DeepSpeed or PEFT (PEFT
wraps Hugging Face modules, ours are not).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    """y = base(x) + scale * dropout(x) A^T B^T, with ``base`` frozen and scale = alpha / r."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {r}")
        self.base = base
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        weight = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True  # False: exactly the base layer (see ``adapters_disabled``)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta_weight(self) -> torch.Tensor:
        return self.scale * (self.lora_B @ self.lora_A)  # (out, in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., out); the low-rank path never materialises the (out, in) update
        if not self.enabled:
            return self.base(x)
        return self.base(x) + self.scale * ((self.drop(x) @ self.lora_A.t()) @ self.lora_B.t())

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (in eval mode: dropout off)."""
        base = self.base
        out = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                        device=base.weight.device, dtype=base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight().to(base.weight.dtype))
            if base.bias is not None:
                out.bias.copy_(base.bias)
        for marker in ("residual_out", "vocab_projection"):  # set by layers.mark_residual / mark_vocab
            if hasattr(base, marker):
                setattr(out, marker, getattr(base, marker))
        return out


def _matches(name: str, targets: list[str]) -> bool:
    """A target names the module's last component (``q_proj``) or a dotted suffix (``attn.q_proj``)."""
    return any(name == t or name.endswith("." + t) for t in targets)


def apply_lora(model: nn.Module, targets: list[str], r: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` whose name matches ``targets``; freeze every other parameter.

    Returns the wrapped module names. Raises ``ValueError`` naming the targets when none matched
    (a typo would otherwise train nothing). A linear whose weight is shared with another module
    (a tied LM head) is refused: merging it would change the embedding too.
    """
    shared = _shared_weight_ids(model)
    wrapped: list[str] = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or isinstance(module, LoRALinear) or not _matches(name, targets):
            continue
        if id(module.weight) in shared:
            raise ValueError(f"lora.targets: {name} shares its weight with another module (tied embeddings); leave it out")
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, r, alpha, dropout))
        wrapped.append(name)
    if not wrapped:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"lora.targets: {targets} match no linear layer (this model has: {', '.join(linears)})")
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
    return wrapped


def _shared_weight_ids(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for _, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {pid for pid, n in seen.items() if n > 1}


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` by its merged ``nn.Linear`` (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.merged())
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (``...lora_A`` / ``...lora_B``), for saving an adapter alone."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.endswith(("lora_A", "lora_B"))}


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Run ``model`` as its frozen base: every ``LoRALinear`` computes ``base(x)`` alone.

    DPO's reference policy is the starting model; with LoRA that is the same weights with the
    adapters off, so no second copy of the model is needed.
    """
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m in layers:
            m.enabled = True
