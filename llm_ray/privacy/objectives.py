"""Federated training's objective: FedProx's proximal term around the round's global weights.

FedProx (Li et al. 2020) adds mu/2 * ||w - w_global||^2 to each client's loss so that clients
with very different data do not drift far from the global model within a round; the client
adds it itself (as Flower's FedProx strategy leaves it to the client). A wrapper over any
objective of the seam, so the worker loop's ``TrainStep`` runs it unchanged.
"""

from __future__ import annotations

import torch

from llm_ray.models.losses import proximal_term
from llm_ray.train.objective import Objective


class Proximal(Objective):
    def __init__(self, base: Objective, mu: float):
        self.base, self.mu = base, mu
        self.name = f"{base.name}+fedprox"
        self.batch_fields = base.batch_fields
        self.anchor: list[torch.Tensor] = []

    def anchor_at(self, params: list[torch.Tensor]) -> None:
        """The round's global weights (the parameters just loaded), as constants."""
        self.anchor = [p.detach().clone() for p in params]

    def loss(self, engine, batch, frozen):
        loss, metrics = self.base.loss(engine, batch, frozen)
        params = [p for p in engine.module.parameters() if p.requires_grad]
        prox = proximal_term(params, self.anchor)
        return loss + 0.5 * self.mu * prox, {**metrics, "proximal": prox.detach()}
