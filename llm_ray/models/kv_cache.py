"""Key/value cache for incremental decoding.

One slot per layer holds that layer's keys and values, (B, n_kv_heads, T, head_dim), and the
padding mask (B, T) of the tokens cached so far (None while no token was padding).

Without ``max_len`` each forward appends by concatenation (O(T^2) copying over a generation).
With ``max_len`` a layer's first update allocates (B, Hkv, max_len, hd) buffers once and later
ones write in place; ``keys[i]``/``values[i]`` are then views of the filled part, so readers
see the same shapes either way. Generation knows its final length, so it preallocates.
"""

from __future__ import annotations

from typing import Optional

import torch


class KVCache:
    """Per-layer growing k/v tensors; a block finds its slot through its ``layer_idx``."""

    def __init__(self, n_layers: int, max_len: Optional[int] = None):
        self.n_layers = n_layers
        self.max_len = max_len
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers
        self.masks: list[Optional[torch.Tensor]] = [None] * n_layers
        # Preallocated (B, Hkv, max_len, hd) storage per layer, when max_len is set.
        self._k_buf: list[Optional[torch.Tensor]] = [None] * n_layers
        self._v_buf: list[Optional[torch.Tensor]] = [None] * n_layers

    def seq_len(self, layer_idx: int) -> int:
        """Tokens cached in one layer."""
        k = self.keys[layer_idx]
        return 0 if k is None else k.shape[2]

    @property
    def length(self) -> int:
        """Tokens cached. Between forward passes every layer holds the same number."""
        return self.seq_len(0)

    def padding_mask(self, layer_idx: int) -> Optional[torch.Tensor]:
        """(B, seq_len) bool mask of the cached tokens (True = real), or None if none is padding."""
        return self.masks[layer_idx]

    def update(
        self,
        layer_idx: int,
        k: torch.Tensor,
        v: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new k, v (B, n_kv_heads, T_new, head_dim); return all of this layer's.

        ``padding_mask`` is the full (B, cached + T_new) mask, or None when nothing is padding;
        it replaces the stored one (``full_padding_mask`` builds it from the stored one).
        """
        self.masks[layer_idx] = padding_mask
        if self.max_len is not None:
            return self._write(layer_idx, k, v)
        if self.keys[layer_idx] is not None:
            k = torch.cat([self.keys[layer_idx], k], dim=2)  # (B, Hkv, S, hd)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v

    def _write(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new k, v into the preallocated buffers; return views of the filled part."""
        past, new = self.seq_len(layer_idx), k.shape[2]
        if past + new > self.max_len:
            raise ValueError(f"KV cache full: {past} cached + {new} new tokens > max_len {self.max_len}")
        if self._k_buf[layer_idx] is None:
            B, H, _, hd = k.shape
            self._k_buf[layer_idx] = k.new_empty(B, H, self.max_len, hd)
            self._v_buf[layer_idx] = v.new_empty(B, H, self.max_len, hd)
        kb, vb = self._k_buf[layer_idx], self._v_buf[layer_idx]
        kb[:, :, past : past + new] = k
        vb[:, :, past : past + new] = v
        self.keys[layer_idx], self.values[layer_idx] = kb[:, :, : past + new], vb[:, :, : past + new]
        return self.keys[layer_idx], self.values[layer_idx]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (B_new,) in every layer, in that order (beam search)."""
        for i in range(self.n_layers):
            if self.keys[i] is None:
                continue
            if self._k_buf[i] is not None:
                S = self.keys[i].shape[2]
                self._k_buf[i] = self._k_buf[i].index_select(0, index)
                self._v_buf[i] = self._v_buf[i].index_select(0, index)
                self.keys[i], self.values[i] = self._k_buf[i][:, :, :S], self._v_buf[i][:, :, :S]
            else:
                self.keys[i] = self.keys[i].index_select(0, index)
                self.values[i] = self.values[i].index_select(0, index)
            if self.masks[i] is not None:
                self.masks[i] = self.masks[i].index_select(0, index)


def full_padding_mask(
    attention_mask: Optional[torch.Tensor],
    kv_cache: Optional[KVCache],
    layer_idx: int,
    new_len: int,
) -> Optional[torch.Tensor]:
    """The (B, cached + new_len) bool padding mask over all keys a layer attends to, or None.

    ``attention_mask`` (1 = real, 0 = padding) may cover all tokens (cached + new, the Hugging
    Face convention) or only the new ones; in the latter case, and when it is None, the mask of
    the cached tokens comes from the cache and new tokens without a mask count as real.
    """
    past = kv_cache.seq_len(layer_idx) if kv_cache is not None else 0
    past_mask = kv_cache.padding_mask(layer_idx) if kv_cache is not None else None
    if attention_mask is None:
        if past_mask is None:
            return None
        ones = torch.ones(past_mask.shape[0], new_len, dtype=torch.bool, device=past_mask.device)
        return torch.cat([past_mask, ones], dim=1)
    mask = attention_mask.bool()
    if mask.shape[1] == past + new_len:
        return mask
    if mask.shape[1] == new_len:
        if past_mask is None:
            past_mask = torch.ones(mask.shape[0], past, dtype=torch.bool, device=mask.device)
        return torch.cat([past_mask, mask], dim=1)
    raise ValueError(
        f"attention_mask has {mask.shape[1]} columns; expected {past + new_len} "
        f"(cached + new tokens) or {new_len} (new tokens only)"
    )
