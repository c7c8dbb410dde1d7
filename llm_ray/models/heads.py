"""Sequence heads on top of our decoder or encoder: class logits and scalar rewards.

``SequenceClassifier`` pools one vector per sequence (decoder: the last real token, which has
seen the whole text under causal attention; encoder: [CLS] or the mean of real tokens) and
projects it to ``num_labels`` logits (B, C); trained by the classification objective with its
own cross entropy. ``num_labels=1`` is a scalar head: ``RewardModel`` returns (B,) rewards.

Inputs are right-padded with ``pad_id``; only the trailing run of pads counts as padding, so a
pad id that also appears inside a text (some tokenizers pad with EOS) does not cut it short.
Callers that know each row's length pass ``lengths`` instead (a final EOS equal to the pad id
then still counts as a real token).

On disk: ``save_classifier`` / ``load_classifier`` in the model-folder package (``bundle/heads.py``).
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.nn as nn

Pooling = Literal["auto", "last", "cls", "mean"]


def real_token_mask(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """(B, T) bool, False on the trailing pads of each right-padded row."""
    is_pad = input_ids == pad_id
    trailing = torch.flip(torch.cumprod(torch.flip(is_pad, [1]).int(), dim=1), [1]).bool()
    return ~trailing


class SequenceClassifier(nn.Module):
    def __init__(self, backbone: nn.Module, num_labels: int, pad_id: int, pooling: Pooling = "auto"):
        super().__init__()
        if num_labels < 1:
            raise ValueError(f"a sequence head needs at least 1 output, got {num_labels}")
        self.backbone = backbone
        self.arch = backbone.cfg.arch
        if pooling == "auto":
            pooling = "last" if self.arch == "decoder" else "cls"
        if self.arch == "decoder" and pooling == "cls":
            raise ValueError("pooling 'cls' needs an encoder: a causal decoder's first token sees only itself")
        self.pooling, self.pad_id, self.num_labels = pooling, pad_id, num_labels
        d = backbone.cfg.d_model
        self.classifier = nn.Linear(d, num_labels)
        nn.init.normal_(self.classifier.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.classifier.bias)

    def hidden_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """input_ids (B, T) -> final hidden states (B, T, d)."""
        b = self.backbone
        if self.arch == "encoder":
            return b.encode(input_ids, mask)
        # Decoder, right padding: real tokens never attend to the pads after them, so no mask
        # is needed and SDPA keeps its causal fast path; positions 0..T-1 are the right ones.
        x = b.embedding(input_ids)  # (B, T, d)
        for layer in b.layers:
            x = layer(x)
        return b.head.norm(x)

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) -> (B, d)."""
        if self.pooling == "cls":
            return x[:, 0]
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
            return (x * m).sum(1) / m.sum(1).clamp(min=1)
        last = (mask.long().sum(1) - 1).clamp(min=0)  # (B,) index of the last real token
        return x[torch.arange(x.shape[0], device=x.device), last]

    def classify(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids (B, T) right-padded, lengths (B,) optional -> logits (B, C)."""
        if lengths is None:
            mask = real_token_mask(input_ids, self.pad_id)
        else:
            mask = torch.arange(input_ids.shape[1], device=input_ids.device) < lengths.unsqueeze(1)  # (B, T)
        pooled = self.pool(self.hidden_states(input_ids, mask), mask)
        return self.classifier(pooled.to(self.classifier.weight.dtype))

    def forward(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classify(input_ids, lengths)  # (B, C)

    def aux_loss(self) -> torch.Tensor:
        return self.backbone.aux_loss()


class RewardModel(SequenceClassifier):
    """r(prompt + response): a scalar head on the pooled last real token, (B, T) -> (B,)."""

    def __init__(self, backbone: nn.Module, pad_id: int, pooling: Pooling = "auto"):
        super().__init__(backbone, 1, pad_id, pooling)

    def forward(self, input_ids: torch.Tensor, lengths: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.classify(input_ids, lengths)[:, 0]  # (B,)


class ValueModel(nn.Module):
    """PPO's critic: a scalar value per position, V(s_t) of the text up to token t, (B, T) -> (B, T).

    Position t is aligned with the policy's label t (it predicts token t+1), so ``values[:, t]``
    is the value of the state in which the action at label t is taken. Decoders only (causal:
    a value must not see the tokens after it). Initialised from a reward model (OpenRLHF's
    default: ``value_head`` takes its scalar head) or from the policy (a fresh head)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        if backbone.cfg.arch != "decoder":
            raise ValueError("a value model needs a decoder: an encoder's values would see the future")
        self.backbone = backbone
        self.value_head = nn.Linear(backbone.cfg.d_model, 1)
        nn.init.normal_(self.value_head.weight, std=backbone.cfg.init_std)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.embedding(input_ids)  # (B, T, d); right padding needs no mask under causal attention
        for layer in b.layers:
            x = layer(x)
        x = b.head.norm(x)
        return self.value_head(x.to(self.value_head.weight.dtype))[..., 0]  # (B, T)

    def aux_loss(self) -> torch.Tensor:
        return self.backbone.aux_loss()
