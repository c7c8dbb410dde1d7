"""Recipe section ``privacy``: differentially private training (DP-SGD) of the engine.
Needs neither torch nor ray."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from llm_ray.config.loader import check as _check


@dataclass
class DPConfig:
    """DP-SGD (Abadi et al. 2016): each example's gradient clipped to ``max_grad_norm``, Gaussian
    noise of std ``noise_multiplier * max_grad_norm`` added once per optimizer step to the sum,
    ε at ``delta`` from Opacus' accountant. Give ``noise_multiplier`` or ``target_epsilon`` (the
    noise that reaches it after ``train.max_steps``). Batches are shuffled fixed-size draws, not
    Poisson sampling: ε is computed at sample rate global_batch_size / examples, as Opacus does
    for shuffled loaders, which is the usual approximation."""

    enabled: bool = False
    noise_multiplier: Optional[float] = None
    target_epsilon: Optional[float] = None
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self):
        _check(self.noise_multiplier is None or self.noise_multiplier > 0, "noise_multiplier", "must be > 0")
        _check(self.target_epsilon is None or self.target_epsilon > 0, "target_epsilon", "must be > 0")
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)")
        _check(self.max_grad_norm > 0, "max_grad_norm", "must be > 0")
        if self.enabled:
            _check((self.noise_multiplier is None) != (self.target_epsilon is None), "noise_multiplier",
                   "give exactly one of noise_multiplier and target_epsilon")


@dataclass
class PrivacyConfig:
    dp: DPConfig = field(default_factory=DPConfig)


@dataclass
class SecureAggregationConfig:
    """Secure aggregation of the client updates (``privacy/secagg.py``): the server only ever
    sees their sum. ``threshold``: clients whose shares rebuild a dropped client's masks (and the
    fewest inputs a round may sum); default ``federated.min_clients``."""

    enabled: bool = False
    threshold: Optional[int] = None
    frac_bits: int = 24  # fixed-point precision of the masked integers (mod 2^64)

    def __post_init__(self):
        _check(self.threshold is None or self.threshold >= 2, "threshold", "must be >= 2 (one input is no aggregate)")
        _check(8 <= self.frac_bits <= 40, "frac_bits", "must be in [8, 40]")


@dataclass
class ClientDPConfig:
    """DP-FedAvg (McMahan et al. 2018): each client's update clipped to ``clip_norm`` and
    Gaussian noise of std ``noise_multiplier * clip_norm`` on the sum, added in equal parts by
    the clients (so the noise is inside the secure sum); equal client weights."""

    enabled: bool = False
    clip_norm: float = 0.5
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self):
        _check(self.clip_norm > 0, "clip_norm", "must be > 0")
        _check(self.noise_multiplier >= 0, "noise_multiplier", "must be >= 0")
        _check(0 < self.delta < 1, "delta", "must be in (0, 1)")


@dataclass
class FederatedConfig:
    """``llm-ray federated``: ``clients`` Ray actors, each training on a shard of ``data.paths``
    that only it reads, for ``rounds`` of ``local_steps`` optimizer steps (each of
    ``train.global_batch_size`` rows), then FedAvg (or FedProx) on the server.

    ``split``: ``iid`` (documents dealt at random) or ``dirichlet``: the corpus in document order
    is cut into ``topics`` contiguous ranges and each topic's documents are dealt to the clients
    in proportions drawn from Dirichlet(``dirichlet_alpha``) (Hsu et al. 2019): small alpha, few
    topics per client. A round goes on when at least ``min_clients`` updates arrive; a client
    that dies or exceeds ``client_timeout_s`` is left out of that round and replaced for the next.
    ``fail_client`` / ``fail_round``: a fault drill, that client's process exits mid-round."""

    clients: int = 4
    rounds: int = 5
    local_steps: int = 4
    strategy: Literal["fedavg", "fedprox"] = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 1.0
    split: Literal["iid", "dirichlet"] = "dirichlet"
    dirichlet_alpha: float = 0.5
    topics: int = 8
    min_clients: int = 2
    heldout: str = ""
    heldout_blocks: int = 32
    cpus_per_client: float = 1.0
    client_timeout_s: float = 600.0
    fail_client: Optional[int] = None
    fail_round: int = 2
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    client_dp: ClientDPConfig = field(default_factory=ClientDPConfig)

    def __post_init__(self):
        _check(self.clients >= 2, "clients", "must be >= 2")
        _check(self.rounds >= 1 and self.local_steps >= 1, "rounds", "rounds and local_steps must be >= 1")
        _check(self.proximal_mu >= 0, "proximal_mu", "must be >= 0")
        _check(self.server_lr > 0, "server_lr", "must be > 0")
        _check(self.dirichlet_alpha > 0, "dirichlet_alpha", "must be > 0")
        _check(self.topics >= 1, "topics", "must be >= 1")
        _check(1 <= self.min_clients <= self.clients, "min_clients", f"must be in [1, clients ({self.clients})]")
        _check(self.heldout_blocks >= 1, "heldout_blocks", "must be >= 1")
        _check(self.cpus_per_client > 0, "cpus_per_client", "must be > 0")
        _check(self.client_timeout_s > 0, "client_timeout_s", "must be > 0")
        _check(self.fail_client is None or 0 <= self.fail_client < self.clients, "fail_client",
               f"must name a client in [0, {self.clients})")
        sa = self.secure_aggregation
        if sa.enabled:
            _check(self.min_clients >= 2, "min_clients", "secure aggregation sums at least 2 clients")
            _check(self.threshold <= self.min_clients, "secure_aggregation.threshold",
                   f"{self.threshold} exceeds min_clients ({self.min_clients}): a round could never be unmasked")

    @property
    def threshold(self) -> int:
        return self.secure_aggregation.threshold or self.min_clients
