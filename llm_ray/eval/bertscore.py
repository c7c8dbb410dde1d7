"""BERTScore (Zhang et al. 2020) with our own encoder (``load_bundle("minilm")`` by default).

Written here rather than calling the ``bert_score`` package because that package loads its
encoder through ``transformers.AutoModel``; we score with the encoder our model folders hold.
The formula is ``bert_score``'s default (no idf weighting, no baseline rescaling):

- embed each sentence with the special tokens ([CLS] ... [SEP]) and L2-normalise every token
  vector of the chosen layer;
- precision: mean over the candidate's tokens of the best cosine with any reference token;
  recall: the same from the reference side; F1 = 2PR / (P + R);
- the special tokens take part in the matching but get weight 0 in the means (as bert_score
  zeroes their idf weight);
- with several references, P, R and F are each the maximum over the references (as bert_score).
An empty sentence scores 0.
"""

from __future__ import annotations

from typing import Optional

import torch

from llm_ray.models.layers import default_position_ids


class BERTScorer:
    def __init__(self, bundle, layer: Optional[int] = None, batch_size: int = 16):
        """``bundle``: a ``ModelBundle`` holding an ``EncoderMLM``; ``layer``: 1-based encoder
        layer whose output is matched (None = the last, i.e. ``encode``'s output)."""
        n_layers = len(bundle.model.layers)
        if layer is not None and not 1 <= layer <= n_layers:
            raise ValueError(f"bertscore_layer {layer} outside 1..{n_layers}")
        if not hasattr(bundle.model, "encode"):
            raise ValueError(f"BERTScore needs an encoder model; {bundle.path} is {bundle.cfg.arch}")
        self.bundle = bundle
        self.layer = layer or n_layers
        self.batch_size = batch_size
        self.pad_id = bundle.pad_id if bundle.pad_id is not None else 0
        self.max_len = bundle.cfg.max_seq_len

    @torch.inference_mode()
    def _hidden(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask (B, T) -> output of encoder layer ``self.layer`` (B, T, d)."""
        model = self.bundle.model
        if self.layer == len(model.layers):
            return model.encode(ids, mask)
        # An earlier layer: EncoderMLM.encode's loop stopped after ``layer`` blocks.
        position_ids = default_position_ids(mask.bool(), 0, ids.shape[1], ids.device)
        x = model.embedding(ids, position_ids)  # (B, T, d)
        for block in model.layers[: self.layer]:
            x = block(x, mask, position_ids)
        return x

    def embed(self, sentences: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per sentence: (unit token vectors (n, d), weights (n,) = 1 for content tokens, 0 for
        special ones)."""
        device = next(self.bundle.model.parameters()).device
        encodings = [self.bundle.tokenizer.encode(s.strip()) for s in sentences]
        out = []
        for i in range(0, len(encodings), self.batch_size):
            batch = encodings[i : i + self.batch_size]
            seqs = [e.ids[: self.max_len] for e in batch]
            T = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
            mask = torch.zeros(len(seqs), T, dtype=torch.long)
            for row, s in enumerate(seqs):
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            hidden = self._hidden(ids.to(device), mask.to(device)).float()  # (B, T, d)
            for row, (enc, s) in enumerate(zip(batch, seqs)):
                vecs = torch.nn.functional.normalize(hidden[row, : len(s)], dim=-1)
                weights = 1.0 - torch.tensor(enc.special_tokens_mask[: len(s)], dtype=torch.float32, device=vecs.device)
                out.append((vecs, weights))
        return out

    @staticmethod
    def pair_score(cand: tuple[torch.Tensor, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, float, float]:
        (h, hw), (r, rw) = cand, ref
        if hw.sum() == 0 or rw.sum() == 0:  # empty sentence
            return 0.0, 0.0, 0.0
        sim = h @ r.T  # (n_cand, n_ref) cosines
        p = float((sim.max(dim=1).values * hw).sum() / hw.sum())
        r_ = float((sim.max(dim=0).values * rw).sum() / rw.sum())
        f = 2 * p * r_ / (p + r_) if p + r_ else 0.0
        return p, r_, f

    def score(self, predictions: list[str], references: list[list[str]]) -> list[tuple[float, float, float]]:
        """(P, R, F1) per prediction."""
        if len(predictions) != len(references):
            raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
        flat_refs = [r for refs in references for r in refs]
        cand_emb = self.embed(predictions)
        ref_emb = self.embed(flat_refs)
        out, j = [], 0
        for c, refs in zip(cand_emb, references):
            scores = [self.pair_score(c, ref_emb[j + k]) for k in range(len(refs))]
            j += len(refs)
            out.append(tuple(max(s[m] for s in scores) for m in range(3)))
        return out


def bertscore(predictions: list[str], references: list[list[str]], scorer: BERTScorer) -> dict:
    """Mean BERTScore precision, recall and F1 over the predictions."""
    scores = scorer.score(predictions, references)
    n = len(scores)
    return {
        "bertscore_precision": sum(s[0] for s in scores) / n,
        "bertscore_recall": sum(s[1] for s in scores) / n,
        "bertscore_f1": sum(s[2] for s in scores) / n,
    }
