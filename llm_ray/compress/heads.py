"""Structured attention-head pruning that really shrinks the model: every layer keeps the same
number of heads, so the config says the new shape (``n_heads``, ``n_kv_heads``, ``d_head``) and
``q_proj`` / ``o_proj`` (and, for whole groups, ``k_proj`` / ``v_proj``) are smaller.

GQA groups are respected: query head h reads k/v head h // rep (rep = n_heads / n_kv_heads),
so a pruned model must keep the same number of query heads in every group.
``unit: query`` removes query heads inside each group (k/v untouched; needs rep > 1);
``unit: group`` removes whole groups (a k/v head and its queries: the KV cache shrinks too).

A head's score is Wanda's |W|·‖X‖ summed over the head's columns of ``o_proj``: Σ_j
‖o_proj[:, j]‖₂ · ‖y_j‖₂, y the attention output over calibration tokens (the head's share of
what the layer adds to the residual stream); without calibration text, Σ_j ‖o_proj[:, j]‖₂ ·
‖q_proj[j, :]‖₂. A group scores the sum of its heads. Kept heads stay in their order with
their weights untouched (bit-identical).
"""

from __future__ import annotations

import dataclasses

import torch

from llm_ray.compress.prune import input_norms, sliced_copy


@torch.no_grad()
def head_scores(model: torch.nn.Module, cfg, calibration: torch.Tensor | None = None) -> list[torch.Tensor]:
    """(n_heads,) score per query head for each layer; ``calibration`` (N, T) token ids or None."""
    attns = [layer.attn for layer in model.layers]
    hd = cfg.head_dim
    col_norms = [a.o_proj.weight.float().norm(dim=0) for a in attns]  # (H * hd,)
    if calibration is None:
        feats = [c * a.q_proj.weight.float().norm(dim=1) for c, a in zip(col_norms, attns)]
    else:
        norms = input_norms(model, {i: a.o_proj for i, a in enumerate(attns)}, calibration)  # ‖y_j‖
        feats = [c * norms[i] for i, c in enumerate(col_norms)]
    return [f.reshape(cfg.n_heads, hd).sum(1) for f in feats]


def kept_heads(scores: torch.Tensor, n_heads: int, kv_heads: int, remove: int, unit: str) -> tuple[list[int], list[int]]:
    """(kept query heads, kept k/v heads) of one layer, ascending, after removing ``remove``
    query heads per group (``unit: query``) or ``remove`` whole groups (``unit: group``)."""
    rep = n_heads // kv_heads
    per_group = scores.reshape(kv_heads, rep)  # (Hkv, rep): head h is row h // rep
    if unit == "group":
        groups = per_group.sum(1).topk(kv_heads - remove).indices.sort().values.tolist()
        return [g * rep + r for g in groups for r in range(rep)], groups
    rows = per_group.topk(rep - remove, dim=1).indices.sort(dim=1).values  # (Hkv, rep - remove)
    return [g * rep + int(r) for g in range(kv_heads) for r in rows[g]], list(range(kv_heads))


def head_plan(cfg, sparsity: float, unit: str) -> int:
    """How many query heads per group (``query``) or groups (``group``) ``sparsity`` removes;
    ValueError when the model's shape cannot honour it."""
    rep = cfg.n_heads // cfg.kv_heads
    if unit == "query":
        if rep == 1:
            raise ValueError(f"every k/v head has one query head (n_heads = n_kv_heads = {cfg.n_heads}): prune whole groups (head_unit: group)")
        remove = round(sparsity * rep)
        if not 1 <= remove < rep:
            raise ValueError(f"sparsity {sparsity} removes {remove} of the {rep} query heads of each group: needs 1 to {rep - 1}")
        return remove
    remove = round(sparsity * cfg.kv_heads)
    if not 1 <= remove < cfg.kv_heads:
        raise ValueError(f"sparsity {sparsity} removes {remove} of the {cfg.kv_heads} k/v groups: needs 1 to {cfg.kv_heads - 1}")
    return remove


def _head_rows(heads: list[int], hd: int) -> torch.Tensor:
    """Indices of the ``hd`` rows (of q/k/v) or columns (of o) each head in ``heads`` owns."""
    return torch.tensor([h * hd + j for h in heads for j in range(hd)])


@torch.no_grad()
def prune_heads(model: torch.nn.Module, cfg, remove: int, unit: str, scores: list[torch.Tensor]):
    """(the pruned model, its config, the kept query heads per layer)."""
    hd = cfg.head_dim
    plans = [kept_heads(s, cfg.n_heads, cfg.kv_heads, remove, unit) for s in scores]
    new_cfg = dataclasses.replace(cfg, n_heads=len(plans[0][0]), n_kv_heads=len(plans[0][1]), d_head=hd)

    def cut(name, src):
        layer, proj = int(name.split(".")[1]), name.rsplit(".", 2)[-2]  # layers.<i>.attn.<proj>.weight|bias
        q_kept, kv_kept = plans[layer]
        if proj == "o_proj":  # its inputs are the heads' outputs; its bias (d_model) is unchanged
            return src[:, _head_rows(q_kept, hd)]
        return src[_head_rows(q_kept if proj == "q_proj" else kv_kept, hd)]

    return sliced_copy(model, new_cfg, cut), new_cfg, [q for q, _ in plans]
