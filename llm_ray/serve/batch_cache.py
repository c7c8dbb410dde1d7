"""A KV cache for a changing set of sequences (continuous batching).

Same interface as ``llm_ray.models.KVCache`` (what attention and the decoder call:
``update(layer_idx, k, v, padding_mask)``, ``seq_len(i)``, ``padding_mask(i)``, ``length``), so
the unchanged ``DecoderLM`` decodes every active sequence in one forward pass.

Layout: rows are sequences, all aligned at the RIGHT: row b's tokens sit in the last
``lengths[b]`` of the ``length`` columns, the columns before are padding (mask False). The
decoder derives RoPE/learned positions from the padding mask (count of real tokens before a
column), so a shorter row that joined later gets exactly the positions it would have alone.

- ``merge(other)`` adds rows (a prefilled cache of newcomers): both sides are left-padded to the
  longer one.
- ``keep(rows)`` drops finished rows and trims the columns that became padding in every row.
- Decoding appends one column per step into preallocated room (no per-step concatenation of the
  whole cache, unlike the simple ``KVCache``); room grows by doubling.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class BatchKVCache:
    """Per-layer k/v buffers (B, Hkv, capacity, hd) and one (B, capacity) padding mask."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.keys: list[Optional[torch.Tensor]] = [None] * n_layers  # (B, Hkv, C, hd)
        self.values: list[Optional[torch.Tensor]] = [None] * n_layers
        self.lens = [0] * n_layers  # columns written per layer (equal between forward passes)
        self.mask: Optional[torch.Tensor] = None  # (B, C) bool, True = real token
        self.has_padding = False  # False: every column of every row is real (fast attention path)

    # -- the interface attention / decoder use ------------------------------------------------
    @property
    def batch_size(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def seq_len(self, layer_idx: int) -> int:
        return self.lens[layer_idx]

    @property
    def length(self) -> int:
        return self.lens[0]

    def padding_mask(self, layer_idx: int) -> Optional[torch.Tensor]:
        """(B, seq_len) bool mask of the cached columns, or None when no row has padding."""
        if not self.has_padding or self.mask is None:
            return None
        return self.mask[:, : self.lens[layer_idx]]

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, padding_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T_new, hd); return this layer's whole (B, Hkv, S, hd) views.

        ``padding_mask`` is the full (B, S) mask of cached + new tokens, or None (all real).
        """
        B, H, T, D = k.shape
        n = self.lens[layer_idx]
        if self.keys[layer_idx] is None:
            cap = max(T, 16)
            self.keys[layer_idx] = k.new_zeros(B, H, cap, D)
            self.values[layer_idx] = v.new_zeros(B, H, cap, D)
        if n + T > self.keys[layer_idx].shape[2]:
            self._grow(layer_idx, n + T)
        self.keys[layer_idx][:, :, n : n + T] = k
        self.values[layer_idx][:, :, n : n + T] = v
        self.lens[layer_idx] = n + T
        if layer_idx == 0:  # every layer gets the same mask; store it once
            self._store_mask(padding_mask, n + T, B, k.device)
        return self.keys[layer_idx][:, :, : n + T], self.values[layer_idx][:, :, : n + T]

    # -- buffers -------------------------------------------------------------------------------
    def _grow(self, layer_idx: int, need: int) -> None:
        old_k, old_v = self.keys[layer_idx], self.values[layer_idx]
        cap = max(need, 2 * old_k.shape[2])
        n = self.lens[layer_idx]
        B, H, _, D = old_k.shape
        self.keys[layer_idx] = old_k.new_zeros(B, H, cap, D)
        self.values[layer_idx] = old_v.new_zeros(B, H, cap, D)
        self.keys[layer_idx][:, :, :n] = old_k[:, :, :n]
        self.values[layer_idx][:, :, :n] = old_v[:, :, :n]

    def _store_mask(self, padding_mask: Optional[torch.Tensor], total: int, B: int, device) -> None:
        cap = self.keys[0].shape[2]
        if self.mask is None or self.mask.shape[1] < cap:
            mask = torch.ones(B, cap, dtype=torch.bool, device=device)
            if self.mask is not None:
                mask[:, : self.mask.shape[1]] = self.mask
            self.mask = mask
        if padding_mask is None:  # the decoder passes None only when no token is padding
            self.mask[:, :total] = True
            self.has_padding = False
        else:
            self.mask[:, :total] = padding_mask.bool()
            self.has_padding = not bool(padding_mask.all())

    def row_lengths(self) -> list[int]:
        """Real tokens per row."""
        if self.mask is None:
            return []
        return self.mask[:, : self.length].sum(dim=1).tolist()

    @classmethod
    def from_prefixes(cls, n_layers: int, prefixes: list[Optional[list[tuple[torch.Tensor, torch.Tensor]]]], lengths: list[int]) -> "BatchKVCache":
        """A cache whose row b holds a cached prompt prefix of ``lengths[b]`` tokens (per layer
        (k, v) of shape (Hkv, n, hd), or None for none), right-aligned; the rest is padding."""
        cache = cls(n_layers)
        n = max(lengths)
        if n == 0:
            return cache
        B = len(prefixes)
        some = next(p for p in prefixes if p is not None)
        H, D = some[0][0].shape[0], some[0][0].shape[2]
        cap = n + 16
        cache.mask = torch.zeros(B, cap, dtype=torch.bool, device=some[0][0].device)
        for i in range(n_layers):
            cache.keys[i] = some[i][0].new_zeros(B, H, cap, D)
            cache.values[i] = some[i][1].new_zeros(B, H, cap, D)
            for b, (pre, m) in enumerate(zip(prefixes, lengths)):
                if m:
                    cache.keys[i][b, :, n - m : n] = pre[i][0]
                    cache.values[i][b, :, n - m : n] = pre[i][1]
            cache.lens[i] = n
        for b, m in enumerate(lengths):
            cache.mask[b, n - m : n] = True
        cache.has_padding = not bool(cache.mask[:, :n].all())
        return cache

    def row_kv(self, row: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Row ``row``'s real tokens per layer: (k, v) each (Hkv, n_real, hd)."""
        n = self.length
        cols = self.mask[row, :n]
        return [(self.keys[i][row, :, :n][:, cols], self.values[i][row, :, :n][:, cols]) for i in range(self.n_layers)]

    # -- rows joining and leaving --------------------------------------------------------------
    def merge(self, other: "BatchKVCache") -> None:
        """Append ``other``'s rows (newcomers) below ours, both right-aligned to the longer one."""
        if other.batch_size == 0:
            return
        if self.batch_size == 0:
            self.__dict__.update(other.__dict__)
            return
        n_a, n_b = self.length, other.length
        n = max(n_a, n_b)
        B_a, B_b = self.batch_size, other.batch_size
        cap = n + 16  # room for the next decode steps before a grow
        device = self.mask.device
        mask = torch.zeros(B_a + B_b, cap, dtype=torch.bool, device=device)
        mask[:B_a, n - n_a : n] = self.mask[:, :n_a]
        mask[B_a:, n - n_b : n] = other.mask[:, :n_b]
        for i in range(self.n_layers):
            for store in (self.keys, self.values):
                a = store[i]
                b = (other.keys if store is self.keys else other.values)[i]
                _, H, _, D = a.shape
                buf = a.new_zeros(B_a + B_b, H, cap, D)
                buf[:B_a, :, n - n_a : n] = a[:, :, :n_a]
                buf[B_a:, :, n - n_b : n] = b[:, :, :n_b].to(a.dtype)
                store[i] = buf
            self.lens[i] = n
        self.mask = mask
        self.has_padding = not bool(mask[:, :n].all())

    def keep(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in this order); drop columns that are padding in every kept row."""
        if len(rows) == 0:
            self.__init__(self.n_layers)
            return
        idx = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        n = self.length
        mask = self.mask.index_select(0, idx)
        real_cols = mask[:, :n].any(dim=0)  # (n,) right-aligned: padding-only columns lead
        start = int(torch.nonzero(real_cols)[0]) if bool(real_cols.any()) else n
        for i in range(self.n_layers):
            self.keys[i] = self.keys[i].index_select(0, idx)[:, :, start:].contiguous()
            self.values[i] = self.values[i].index_select(0, idx)[:, :, start:].contiguous()
            self.lens[i] = n - start
        self.mask = mask[:, start:].contiguous()
        self.has_padding = not bool(self.mask[:, : n - start].all())
