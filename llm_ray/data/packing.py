"""Pack tokenized documents into fixed-length blocks, and turn blocks into training examples.

Causal LM blocks hold ``seq_len + 1`` tokens (inputs are the first ``seq_len``, labels the
last ``seq_len``); masked-LM blocks hold ``seq_len``. Documents are joined with a separator
(EOS for BPE, [SEP] for WordPiece) so the model sees where one ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llm_ray.models.losses import IGNORE_INDEX  # one definition for data, losses and eval


def pack_sequences(documents: list[list[int]], block_len: int, sep_id: int) -> np.ndarray:
    """Concatenate documents with ``sep_id`` after each and cut into (N, block_len) int32 blocks.

    The tail shorter than one block is dropped (at most ``block_len - 1`` tokens).
    """
    if block_len < 2:
        raise ValueError(f"block_len must be >= 2, got {block_len}")
    total = sum(len(d) + 1 for d in documents)
    flat = np.empty(total, dtype=np.int32)
    pos = 0
    for doc in documents:
        n = len(doc)
        flat[pos : pos + n] = doc
        flat[pos + n] = sep_id
        pos += n + 1
    n_blocks = total // block_len
    if n_blocks == 0:
        raise ValueError(f"corpus has {total} tokens, fewer than one block of {block_len}")
    return flat[: n_blocks * block_len].reshape(n_blocks, block_len)


def causal_lm_example(blocks: np.ndarray) -> dict[str, np.ndarray]:
    """(B, T+1) blocks -> inputs (B, T) and next-token labels (B, T)."""
    return {"input_ids": blocks[:, :-1].astype(np.int64), "labels": blocks[:, 1:].astype(np.int64)}


@dataclass(frozen=True)
class MaskingSpec:
    mask_id: int
    vocab_size: int
    probability: float = 0.15
    special_ids: tuple[int, ...] = ()  # never selected for prediction


def masked_lm_example(blocks: np.ndarray, positions: np.ndarray, spec: MaskingSpec, seed: int) -> dict[str, np.ndarray]:
    """BERT masking: pick ``probability`` of tokens; of those 80% -> [MASK], 10% random, 10% kept.

    Randomness comes from (seed, global sample position), not from a process RNG, so the same
    sample is masked the same way whatever the world size and after a resume.
    """
    inputs = blocks.astype(np.int64)
    labels = np.full_like(inputs, IGNORE_INDEX)
    for row, pos in enumerate(positions):
        rng = np.random.default_rng([seed, int(pos)])
        tokens = inputs[row]
        eligible = ~np.isin(tokens, spec.special_ids)
        pick = (rng.random(tokens.shape) < spec.probability) & eligible
        if not pick.any():  # keep at least one prediction target per row
            candidates = np.flatnonzero(eligible)
            if candidates.size:
                pick[rng.choice(candidates)] = True
        labels[row, pick] = tokens[pick]
        action = rng.random(tokens.shape)
        tokens[pick & (action < 0.8)] = spec.mask_id
        random_slot = pick & (action >= 0.8) & (action < 0.9)
        tokens[random_slot] = rng.integers(0, spec.vocab_size, size=int(random_slot.sum()))
    return {"input_ids": inputs, "labels": labels}
