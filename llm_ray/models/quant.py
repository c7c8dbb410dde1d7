"""Weight quantization as plain tensor functions: what a quantized model folder stores.

- int8, per row (output channel) symmetric: q = round(w / s), s = max|w_row| / 127. An
  embedding row is a token's vector, so the same per-row scheme quantizes a (tied) embedding
  as llama.cpp's Q8_0 does per block: a fifth of SmolLM2's weights, which left in fp32 would
  cap the size ratio near 2.5x.
- int4, per group of ``group_size`` inputs within a row, symmetric in [-7, 7] (offset by 8
  into a nibble), two weights per byte: s = max|w_group| / 7.
- bf16 / fp16: every float tensor cast (half the bytes of fp32).
- int8 dynamic: the int8 folder, run with activations quantized too (``Int8DynamicLinear``):
  each token's input row scaled to int8 at run time, an int8 x int8 -> int32 matmul.

Written by hand because the folder format is ours: torchao's ``quantize_`` gives tensor
subclasses for its kernels, not a file layout, and on this project's CPUs its int8 paths were
measured slower than fp32 (SmolLM2-shaped 576x1536 linear, 1 thread: fp32 0.17 ms, torchao
int8 weight-only 0.38 ms, int8 dynamic 1.9 ms at batch 1). PyTorch's own int8 matmul
(``torch._int_mm``, the op torchao's int8 dynamic path calls on GPUs) measured 1.5x (batch 1)
to 5.6x (batch 64) faster than fp32 on the same linear here: ``Int8DynamicLinear`` uses it.
A loader may dequantize (fp32 compute) or hand the integers to a kernel; the stored bytes are
the same.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

Scheme = Literal["int8", "int4", "bf16", "fp16"]
CASTS = {"bf16": torch.bfloat16, "fp16": torch.float16}
QWEIGHT, QSCALE = ".qweight", ".qscale"  # suffixes of a quantized tensor's stored parts


def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, I) float -> (O, I) int8 and (O, 1) fp32 scales; an all-zero row gets scale 1."""
    w = w.detach().float()
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, I) float -> (O, I/2) uint8 (two nibbles per byte, low nibble first) and
    (O, I/group_size) fp32 scales. I must be a multiple of group_size, group_size even."""
    out_f, in_f = w.shape
    if group_size % 2 or in_f % group_size:
        raise ValueError(f"int4: {in_f} inputs do not split into even groups of {group_size}")
    g = w.detach().float().reshape(out_f, in_f // group_size, group_size)  # (O, G, group)
    scale = g.abs().amax(dim=2) / 7
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = (torch.round(g / scale[..., None]).clamp(-7, 7) + 8).to(torch.uint8).reshape(out_f, in_f)
    return q[:, 0::2] | (q[:, 1::2] << 4), scale


def dequantize_int4_groups(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, half = packed.shape
    q = torch.empty(out_f, half * 2, dtype=torch.int16, device=packed.device)
    q[:, 0::2], q[:, 1::2] = (packed & 0xF).to(torch.int16), (packed >> 4).to(torch.int16)
    groups = scale.shape[1]
    return ((q.float() - 8).reshape(out_f, groups, -1) * scale[..., None]).reshape(out_f, half * 2)


def quantizable(name: str, t: torch.Tensor, scheme: Scheme, group_size: int) -> bool:
    """Matrices only (norms and biases stay float: tiny, and sensitive); int4 needs whole groups."""
    if t.dim() != 2 or not t.is_floating_point():
        return False
    return scheme == "int8" or t.shape[1] % group_size == 0


def quantize_state_dict(state: dict[str, torch.Tensor], scheme: Scheme, group_size: int = 64) -> tuple[dict, list[str]]:
    """(tensors to store, names quantized): each quantized ``name`` becomes ``name.qweight``
    and ``name.qscale``; the rest are stored as they are (cast, for bf16 / fp16)."""
    out, names = {}, []
    for name, t in state.items():
        if scheme in CASTS:
            cast = t.is_floating_point()
            out[name] = t.detach().to(CASTS[scheme]).contiguous() if cast else t.detach().contiguous()
            names += [name] if cast else []
        elif quantizable(name, t, scheme, group_size):
            q, s = quantize_int8_rows(t) if scheme == "int8" else quantize_int4_groups(t, group_size)
            out[name + QWEIGHT], out[name + QSCALE] = q.contiguous(), s.contiguous()
            names.append(name)
        else:
            out[name] = t.detach().contiguous()
    return out, names


def dequantize_state_dict(stored: dict[str, torch.Tensor], scheme: Scheme) -> dict[str, torch.Tensor]:
    """The float state dict of stored tensors written by ``quantize_state_dict``."""
    out = {}
    for name, t in stored.items():
        if name.endswith(QSCALE):
            continue
        if name.endswith(QWEIGHT):
            base = name[: -len(QWEIGHT)]
            scale = stored[base + QSCALE]
            out[base] = dequantize_int8_rows(t, scale) if scheme == "int8" else dequantize_int4_groups(t, scale)
        else:
            out[name] = t.float() if t.is_floating_point() else t
    return out


def fake_quantize(w: torch.Tensor, scheme: Scheme, group_size: int = 64) -> torch.Tensor:
    """``w`` rounded as ``quantize_state_dict`` would store it, in w's dtype, with a
    straight-through gradient (d out / d w = 1: quantization-aware training). The scales are
    the stored ones (max |w| per row or group), taken from the current weights."""
    if scheme in CASTS:
        q = w.detach().to(CASTS[scheme]).to(w.dtype)
    elif scheme == "int8":
        q = dequantize_int8_rows(*quantize_int8_rows(w)).to(w.dtype)
    else:
        q = dequantize_int4_groups(*quantize_int4_groups(w, group_size)).to(w.dtype)
    return w + (q - w).detach()


def _int8_matmul(xq: torch.Tensor, wq_t: torch.Tensor) -> torch.Tensor:
    """(M, K) int8 @ (K, N) int8 -> (M, N) int32. ``torch._int_mm`` where it runs (CPU; CUDA
    with M > 16 and K, N multiples of 8), else the same sums in fp32 (exact while each stays
    below 2^24, about K < 1040 at full scale; a slight rounding beyond)."""
    ok = hasattr(torch, "_int_mm") and (not xq.is_cuda or (xq.shape[0] > 16 and xq.shape[1] % 8 == 0 and wq_t.shape[1] % 8 == 0))
    if ok:
        return torch._int_mm(xq, wq_t)
    return (xq.float() @ wq_t.float()).round().to(torch.int32)


class Int8DynamicLinear(nn.Module):
    """A linear with int8 weights (per output row) and int8 activations (per token, scaled at
    run time): y = (x_q @ w_q^T) · s_x · s_w + b. Inference only (no gradient reaches int8)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int8_rows(linear.weight)  # an int8 folder's dequantized rows round back to its ints
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight_t", q.t().contiguous())  # (I, O) int8: _int_mm's right operand
        self.register_buffer("wscale", scale.t().contiguous())  # (1, O)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).float()  # (M, I)
        xscale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # (M, 1)
        xq = torch.round(rows / xscale).clamp(-127, 127).to(torch.int8)
        y = _int8_matmul(xq, self.qweight_t).float() * xscale * self.wscale  # (M, O)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def apply_int8_dynamic(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of the model (blocks and LM head; the embedding lookup stays float)
    replaced by ``Int8DynamicLinear``, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8DynamicLinear(child))
    return model
