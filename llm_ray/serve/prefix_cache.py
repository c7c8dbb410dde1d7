"""Prefix caching: the KV of prompt prefixes already seen, reused instead of recomputed.

As vLLM's automatic prefix caching: prompts are cut into blocks of ``block_size`` tokens and a
block is named by a hash chained over every token up to its end (sha256 of the parent block's
digest and this block's ids), so one name means one whole prefix. A block holds each layer's
keys and values for its tokens, (Hkv, block, hd). Requests that share a system prompt, few-shot
examples or one prompt's n samples find its blocks and prefill only the rest.

Bounded in tokens with LRU eviction. A lookup touches blocks from the last to the first, so a
prefix's first blocks are the most recent and eviction takes chain ends first (a dropped middle
block only makes the blocks after it unreachable until they are evicted in turn).
Weights change the KV: ``clear()`` on every weight update.
"""

from __future__ import annotations

import collections
import hashlib
from array import array
from typing import Optional

import torch


class PrefixCache:
    def __init__(self, capacity_tokens: int, block_size: int = 16):
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.capacity_tokens = capacity_tokens
        self.block_size = block_size
        # digest -> per layer (k, v), each (Hkv, block_size, hd)
        self.blocks: collections.OrderedDict[bytes, list[tuple[torch.Tensor, torch.Tensor]]] = collections.OrderedDict()
        self.queried_tokens = 0  # prompt tokens looked up
        self.hit_tokens = 0  # of those, found in the cache

    @property
    def enabled(self) -> bool:
        return self.capacity_tokens >= self.block_size

    @property
    def cached_tokens(self) -> int:
        return len(self.blocks) * self.block_size

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0

    def _digests(self, ids: list[int], n_blocks: int) -> list[bytes]:
        out, parent = [], b""
        for b in range(n_blocks):
            block = array("q", ids[b * self.block_size : (b + 1) * self.block_size]).tobytes()
            parent = hashlib.sha256(parent + block).digest()
            out.append(parent)
        return out

    def lookup(self, ids: list[int]) -> tuple[int, Optional[list[tuple[torch.Tensor, torch.Tensor]]]]:
        """(n, per layer (k, v) of shape (Hkv, n, hd)) for the longest cached prefix of ``ids``;
        at most ``len(ids) - 1`` tokens (the last prompt token is always computed: its logits
        pick the first output token). (0, None) on a miss."""
        if not self.enabled:
            return 0, None
        self.queried_tokens += len(ids)
        found = []
        for d in self._digests(ids, (len(ids) - 1) // self.block_size):
            block = self.blocks.get(d)
            if block is None:
                break
            found.append((d, block))
        for d, _ in reversed(found):  # LRU: the chain's first blocks end up the most recent
            self.blocks.move_to_end(d)
        if not found:
            return 0, None
        n = len(found) * self.block_size
        self.hit_tokens += n
        layers = [
            (torch.cat([blk[i][0] for _, blk in found], dim=1), torch.cat([blk[i][1] for _, blk in found], dim=1))
            for i in range(len(found[0][1]))
        ]
        return n, layers

    def store(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Keep the full blocks of a prefilled prompt; ``layers``: per layer (k, v) (Hkv, len(ids), hd)."""
        if not self.enabled:
            return
        bs = self.block_size
        digests = self._digests(ids, len(ids) // bs)
        for b, d in enumerate(digests):
            if d not in self.blocks:
                self.blocks[d] = [(k[:, b * bs : (b + 1) * bs].clone(), v[:, b * bs : (b + 1) * bs].clone()) for k, v in layers]
        for d in reversed(digests):  # as in lookup: the chain's first blocks the most recent
            self.blocks.move_to_end(d)
        while self.cached_tokens > self.capacity_tokens:
            self.blocks.popitem(last=False)

    def clear(self) -> None:
        self.blocks.clear()
