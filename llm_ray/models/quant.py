"""Weight quantization as plain tensor functions: what a quantized model folder stores.

- int8, per row (output channel) symmetric: q = round(w / s), s = max|w_row| / 127. An
  embedding row is a token's vector, so the same per-row scheme quantizes a (tied) embedding
  as llama.cpp's Q8_0 does per block: a fifth of SmolLM2's weights, which left in fp32 would
  cap the size ratio near 2.5x.
- int4, per group of ``group_size`` inputs within a row, symmetric in [-7, 7] (offset by 8
  into a nibble), two weights per byte: s = max|w_group| / 7.
- bf16 / fp16: every float tensor cast (half the bytes of fp32).

Written by hand because the folder format is ours: torchao's ``quantize_`` gives tensor
subclasses for its kernels, not a file layout, and on this project's CPUs its int8 paths were
measured slower than fp32 (SmolLM2-shaped 576x1536 linear, 1 thread: fp32 0.17 ms, torchao
int8 weight-only 0.38 ms, int8 dynamic 1.9 ms at batch 1). A loader may dequantize (fp32
compute) or hand the integers to a kernel; the stored bytes are the same.
"""

from __future__ import annotations

from typing import Literal

import torch

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
