"""Document-boundary attention masking in the decoder: with ``segment_ids`` a packed sequence
behaves as its documents run one by one (block-diagonal causal attention, positions restarting
per document); without them the model is unchanged."""

from __future__ import annotations

import pytest
import torch

from llm_ray.config import ModelConfig
from llm_ray.models.attention import segment_position_ids
from llm_ray.models.decoder import DecoderLM


def _model(positions: str) -> DecoderLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, positions=positions)
    return DecoderLM(cfg).eval()


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_packed_documents_give_the_logits_of_each_document_alone(positions):
    model = _model(positions)
    gen = torch.Generator().manual_seed(1)
    doc1, doc2 = torch.randint(0, 101, (1, 7), generator=gen), torch.randint(0, 101, (1, 12), generator=gen)
    packed = torch.cat([doc1, doc2], dim=1)  # (1, 19)
    segments = torch.tensor([[4] * 7 + [5] * 12])
    with torch.no_grad():
        masked = model(packed, segment_ids=segments)
        alone1, alone2 = model(doc1), model(doc2)
        plain = model(packed)
    torch.testing.assert_close(masked[:, 7:], alone2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[:, :7], alone1, atol=1e-5, rtol=1e-5)
    assert (plain[:, 7:] - alone2).abs().max() > 1e-2  # without segments doc 2 does see doc 1
    torch.testing.assert_close(plain, model(packed, segment_ids=torch.zeros_like(packed)))  # one document = plain causal


def test_segment_positions_restart_per_document():
    seg = torch.tensor([[3, 3, 4, 4, 4, 9], [0, 0, 0, 0, 1, 1]])
    assert segment_position_ids(seg).tolist() == [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


def test_segment_ids_train_a_batch_with_gradients():
    """A training step on a batch of two packed rows: finite loss and gradients."""
    model = _model("rope").train()
    ids = torch.randint(0, 101, (2, 16))
    seg = torch.tensor([[0] * 5 + [1] * 11, [2] * 16])
    logits = model(ids[:, :-1], segment_ids=seg[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 101), ids[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
