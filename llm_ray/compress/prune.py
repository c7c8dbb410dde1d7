"""Structured pruning that really shrinks the model: FFN channels removed, every layer keeping
the same number, so the config says the new shape (``d_ff``) and the matrices are smaller.

A channel j of an FFN is row j of ``gate`` / ``up`` and column j of ``down``. Its score is
Wanda's |W|·‖X‖ taken per channel: ‖down[:, j]‖₂ · ‖h_j‖₂, where h is the input of ``down``
(the channel's activation) over calibration tokens; without calibration text,
‖down[:, j]‖₂ · ‖up_j‖₂ (· ‖gate_j‖₂ for SwiGLU). The lowest-scoring channels of each layer
go; the kept ones stay in their order with their weights untouched (bit-identical).

``torch.nn.utils.prune`` only masks weights with zeros, which shrinks nothing, so the slicing
is written here.
"""

from __future__ import annotations

import dataclasses

import torch

from llm_ray.models.ffn import GeluMLP, SwiGLU


def dense_ffns(model: torch.nn.Module) -> list:
    """Each layer's FFN; a mixture-of-experts layer has no single set of channels to prune."""
    ffns = [layer.ffn for layer in model.layers]
    if not all(isinstance(f, (SwiGLU, GeluMLP)) for f in ffns):
        raise ValueError("FFN channel pruning needs dense FFNs (model.moe.num_experts: 0)")
    return ffns


@torch.no_grad()
def ffn_channel_scores(model: torch.nn.Module, calibration: torch.Tensor | None = None, batch: int = 8) -> list[torch.Tensor]:
    """(d_ff,) score per channel for each layer; ``calibration`` (N, T) token ids or None."""
    ffns = dense_ffns(model)
    weight_norms = [f.down.weight.float().norm(dim=0) for f in ffns]  # (d_ff,) column norms of down
    if calibration is None:
        out = []
        for f, w in zip(ffns, weight_norms):
            s = w * f.up.weight.float().norm(dim=1)
            out.append(s * f.gate.weight.float().norm(dim=1) if isinstance(f, SwiGLU) else s)
        return out
    norms = input_norms(model, {i: f.down for i, f in enumerate(ffns)}, calibration, batch)  # ‖h_j‖ per channel
    return [w * norms[i] for i, w in enumerate(weight_norms)]


@torch.no_grad()
def prune_ffn_channels(model: torch.nn.Module, cfg, keep: int, scores: list[torch.Tensor]):
    """(the pruned model, its config with ``d_ff = keep``, the kept channel ids per layer)."""
    if not 1 <= keep <= cfg.ffn_dim:
        raise ValueError(f"keep {keep} channels of {cfg.ffn_dim}")
    new_cfg = dataclasses.replace(cfg, d_ff=keep)
    kept = [s.topk(keep).indices.sort().values for s in scores]  # the best, in their order

    def cut(name, src):
        layer, part = int(name.split(".")[1]), name.rsplit(".", 2)[-2]  # layers.<i>.ffn.<part>.weight|bias
        return src[:, kept[layer]] if part == "down" and name.endswith("weight") else src[kept[layer]]

    return sliced_copy(model, new_cfg, cut), new_cfg, kept


def sliced_copy(model: torch.nn.Module, new_cfg, cut) -> torch.nn.Module:
    """A model of the smaller ``new_cfg`` holding ``model``'s weights: tensors whose shape did
    not change as they are, the others as ``cut(name, tensor)`` returns them (strict load)."""
    from llm_ray.models import build_model

    pruned = build_model(new_cfg)
    state = model.state_dict()
    new_state = {name: state[name] if state[name].shape == t.shape else cut(name, state[name])
                 for name, t in pruned.state_dict().items()}
    pruned.load_state_dict(new_state, strict=True)
    return pruned.eval()


def calibration_ids(tokenizer, path: str, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) token ids: the first ``n_tokens`` tokens of a text file in rows."""
    with open(path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read()).ids[:n_tokens]
    return _rows(ids, seq_len, path)


def shard_calibration_ids(dataset, tokenizer, n_tokens: int, seq_len: int) -> torch.Tensor:
    """(N, seq_len) token ids: the first ``n_tokens`` tokens of a prepared dataset (``llm-ray
    data prepare``'s shards, local or s3://, in manifest order), checked to be packed with the
    model's tokenizer; sealed shards are decrypted in memory."""
    from llm_ray.data.shards import read_shard, shard_key

    manifest = check_calibration_shards(dataset, tokenizer)
    key = shard_key(manifest, dataset.uri)
    ids: list[int] = []
    for shard in manifest["shards"]:
        ids += read_shard(dataset, shard["name"], key).reshape(-1).tolist()
        if len(ids) >= n_tokens:
            break
    return _rows(ids[:n_tokens], seq_len, dataset.uri)


def check_calibration_shards(dataset, tokenizer) -> dict:
    """The dataset's manifest; ValueError when there is none or its tokenizer is not the model's,
    EncryptionError when its shards are sealed and this process has no key (or another)."""
    from llm_ray.data.shards import read_manifest, shard_key
    from llm_ray.data.tokenizer import tokenizer_hash

    manifest = read_manifest(dataset)
    if manifest is None:
        raise ValueError(f"no manifest.json under {dataset.uri}: run `llm-ray data prepare` first")
    if manifest["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise ValueError(f"{dataset.uri} was packed with another tokenizer ({manifest['tokenizer_hash']}) than the model's "
                         f"({tokenizer_hash(tokenizer)}): prepare it with data.tokenizer.path set to the model folder's tokenizer.json")
    shard_key(manifest, dataset.uri)  # sealed and no key: refused here, before any work
    return manifest


def _rows(ids: list[int], seq_len: int, source: str) -> torch.Tensor:
    rows = len(ids) // seq_len
    if rows == 0:
        raise ValueError(f"{source}: {len(ids)} tokens, fewer than one row of {seq_len}")
    return torch.tensor(ids[:rows * seq_len]).reshape(rows, seq_len)


# -- unstructured pruning: zeros in place (a dense file does not shrink; non-zeros fall) ----------
def layer_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The transformer blocks' linear maps (attention and FFN); the embedding and the LM head
    stay dense, as in Wanda."""
    return {f"layers.{i}.{n}": m for i, layer in enumerate(model.layers) for n, m in layer.named_modules()
            if isinstance(m, torch.nn.Linear)}


@torch.no_grad()
def input_norms(model: torch.nn.Module, linears: dict, calibration: torch.Tensor, batch: int = 8) -> dict:
    """‖X_j‖₂ over the calibration tokens (N, T) of each linear's input feature j, by the keys
    of ``linears`` (one pass of the dense model, forward-pre hooks)."""
    sums = {name: torch.zeros(m.in_features) for name, m in linears.items()}

    def hook(name):
        def pre(module, args):
            x = args[0].float().reshape(-1, args[0].shape[-1])
            sums[name] += (x * x).sum(0).cpu()
        return pre

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        model.eval()
        for i in range(0, len(calibration), batch):
            model(calibration[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return {n: s.sqrt() for n, s in sums.items()}


def _keep_mask(score: torch.Tensor, sparsity: float, per_row: bool, n_m: tuple[int, int] | None) -> torch.Tensor:
    """True where a weight stays: the highest scores per row / per matrix, or N of every M inputs."""
    if n_m is not None:
        n, m = n_m
        if score.shape[1] % m:
            raise ValueError(f"{n}:{m} sparsity needs inputs in groups of {m}, got {score.shape[1]}")
        groups = score.reshape(score.shape[0], -1, m)  # (O, I/M, M)
        keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
        return keep.reshape(score.shape)
    flat = score if per_row else score.reshape(1, -1)
    k = flat.shape[1] - int(sparsity * flat.shape[1])  # kept per row (or per matrix)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(k, dim=1).indices, True)
    return keep.reshape(score.shape)


@torch.no_grad()
def prune_unstructured(model: torch.nn.Module, method: str, sparsity: float, calibration: torch.Tensor | None = None,
                       n_m: tuple[int, int] | None = None) -> dict:
    """Zero weights of the blocks' linears in place; returns {name: share zeroed}.

    ``magnitude``: the smallest |W| of each matrix; ``magnitude_global``: of all of them at once;
    ``wanda``: the smallest |W_ij|·‖X_j‖ within each output row (Sun et al. 2023), from the
    dense model's activations on ``calibration``. ``n_m`` = (2, 4): N of every M inputs kept
    (by the method's score) instead of a share.
    """
    linears = layer_linears(model)
    if method == "wanda":
        if calibration is None:
            raise ValueError("wanda needs calibration text (activation norms)")
        norms = input_norms(model, linears, calibration)
        scores = {n: m.weight.abs().float() * norms[n][None, :] for n, m in linears.items()}
    else:
        scores = {n: m.weight.abs().float() for n, m in linears.items()}
    if method == "magnitude_global" and n_m is None:
        everything = torch.cat([s.reshape(-1) for s in scores.values()])
        threshold = everything.kthvalue(max(1, int(sparsity * everything.numel()))).values
        masks = {n: s > threshold for n, s in scores.items()}
    else:
        masks = {n: _keep_mask(s, sparsity, per_row=method == "wanda", n_m=n_m) for n, s in scores.items()}
    for n, m in linears.items():
        m.weight.mul_(masks[n].to(m.weight.dtype))
    return {n: float(1 - masks[n].float().mean()) for n in linears}
