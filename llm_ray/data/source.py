"""The small interface between training and where its tokens come from.

A source serves micro batches addressed by a global sample position (see ``sampler.py``); the
training loop only keeps that position in its checkpoint. ``TokenBlockSource`` serves
in-memory packed blocks (local text files here); the object-storage streaming source of the
data pipeline implements the same ``micro_batch`` call.
"""

from __future__ import annotations

from typing import Iterator, Optional, Protocol

import numpy as np

from llm_ray.data.packing import MaskingSpec, causal_lm_example, masked_lm_example, pack_sequences
from llm_ray.data.sampler import GlobalSampler


class TrainingSource(Protocol):
    num_samples: int

    def micro_batch(self, start: int, micro_step: int, dp_rank: int, dp_size: int, micro: int) -> dict[str, np.ndarray]:
        """Rows for one rank's micro step; keys input_ids, labels (B, T) and sample_ids (B,)."""
        ...

    def iterate(self, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int) -> Iterator[dict]:
        """This rank's micro batches for ``steps`` optimizer steps from data position ``start``."""
        ...


def iterate_micro_batches(source, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int):
    """``iterate`` for sources with cheap random access: micro batches in step order."""
    global_batch = micro * dp_size * accum
    for step in range(steps):
        for m in range(accum):
            yield source.micro_batch(start + step * global_batch, m, dp_rank, dp_size, micro)


class ArraySource:
    """A ``TrainingSource`` over fixed examples held as equal-length arrays (SFT examples,
    preference pairs, their precomputed reference log-probs), in the same seeded global
    order as pretraining; a micro batch carries every array under its own key."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int):
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) != 1 or not lengths.pop():
            raise ValueError(f"no training examples (or arrays of different lengths: {sorted(arrays)})")
        self.arrays = arrays
        self.num_samples = len(next(iter(arrays.values())))
        self.sampler = GlobalSampler(self.num_samples, seed)

    def micro_batch(self, start: int, micro_step: int, dp_rank: int, dp_size: int, micro: int) -> dict[str, np.ndarray]:
        ids = self.sampler.sample_ids(self.sampler.micro_batch_positions(start, micro_step, dp_rank, dp_size, micro))
        return {**{k: a[ids] for k, a in self.arrays.items()}, "sample_ids": ids}

    def iterate(self, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int) -> Iterator[dict]:
        return iterate_micro_batches(self, start, dp_rank, dp_size, micro, accum, steps)


class TokenBlockSource:
    def __init__(self, blocks: np.ndarray, objective: str, seed: int, masking: Optional[MaskingSpec] = None):
        if objective == "masked_lm" and masking is None:
            raise ValueError("masked_lm needs a MaskingSpec")
        self.blocks = blocks
        self.objective = objective
        self.seed = seed
        self.masking = masking
        self.sampler = GlobalSampler(len(blocks), seed)
        self.num_samples = len(blocks)

    def micro_batch(self, start: int, micro_step: int, dp_rank: int, dp_size: int, micro: int) -> dict[str, np.ndarray]:
        positions = self.sampler.micro_batch_positions(start, micro_step, dp_rank, dp_size, micro)
        ids = self.sampler.sample_ids(positions)
        rows = self.blocks[ids]
        if self.objective == "causal_lm":
            out = causal_lm_example(rows)
        else:
            out = masked_lm_example(rows, positions, self.masking, self.seed)
        out["sample_ids"] = ids
        return out

    def iterate(self, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int) -> Iterator[dict]:
        return iterate_micro_batches(self, start, dp_rank, dp_size, micro, accum, steps)


def text_blocks(paths: list[str], tokenizer, seq_len: int, objective: str, sep_id: int) -> np.ndarray:
    """Read local text files, tokenize every document and pack into training blocks."""
    from llm_ray.data.text_files import list_text_files, read_documents
    from llm_ray.data.tokenizer import encode_documents

    documents = read_documents(list_text_files(paths))
    ids = encode_documents(tokenizer, documents)
    block_len = seq_len + 1 if objective == "causal_lm" else seq_len
    return pack_sequences(ids, block_len, sep_id)
