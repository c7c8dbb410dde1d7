"""One federated client: a Ray actor that owns a private shard and trains on it.

The client reads its own documents (``split_documents`` picks them from the corpus by its
index, deterministically, inside this process: the driver never reads or receives them), packs
them, and trains with the one engine: a one-process DeepSpeed engine from ``build_engine`` and
the worker loop's ``TrainStep`` over the objective seam (FedProx's proximal term is an
objective wrapper). What leaves the actor is its model update (plain, or masked for secure
aggregation), its sample count and its loss.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Optional

import numpy as np

from llm_ray.privacy.secagg import SecAggClient, encode

FAULT_EXIT_CODE = 17  # fault drill: the process exits mid-round, as a lost device would


def split_documents(n_docs: int, clients: int, split: str, alpha: float, topics: int, seed: int) -> list[np.ndarray]:
    """Document indices of every client. ``iid``: dealt at random. ``dirichlet``: the corpus in
    document order is cut into ``topics`` contiguous ranges (neighbouring documents share a
    subject); each topic's documents go to the clients in Dirichlet(alpha) proportions. A client
    left with no document takes one from the largest shard, so every client can train."""
    rng = np.random.default_rng([seed, 0xFED])
    if split == "iid":
        return [np.sort(part) for part in np.array_split(rng.permutation(n_docs), clients)]
    topic_of = np.arange(n_docs) * topics // max(n_docs, 1)
    shards: list[list[int]] = [[] for _ in range(clients)]
    for k in range(topics):
        docs = rng.permutation(np.flatnonzero(topic_of == k))
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients))[:-1] * len(docs)).astype(int)
        for c, part in enumerate(np.split(docs, cuts)):
            shards[c].extend(part.tolist())
    for c in range(clients):
        if not shards[c]:
            donor = max(range(clients), key=lambda i: len(shards[i]))
            shards[c].append(shards[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def topic_histogram(doc_ids: np.ndarray, n_docs: int, topics: int) -> list[int]:
    """How many of a shard's documents fall in each topic (how non-IID the split is)."""
    return np.bincount(doc_ids * topics // max(n_docs, 1), minlength=topics).tolist()


def _single_process_group(backend: str) -> None:
    """A world of one for DeepSpeed (each client trains alone; aggregation is the server's)."""
    import deepspeed

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)


def load_vector(params: list, vector) -> None:
    """Copy a flat vector into the parameters in place (``vector_to_parameters`` would make
    them views of the vector: later in-place updates would then change the vector too)."""
    import torch

    with torch.no_grad():
        offset = 0
        for p in params:
            p.copy_(vector[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def clip_and_noise(delta: np.ndarray, clip_norm: float, noise_std: float) -> tuple[np.ndarray, float]:
    """DP-FedAvg's client step: the update scaled to norm <= clip_norm, plus this client's part of
    the noise (fresh OS entropy: the server must not be able to predict it). Returns it and the
    update's norm before clipping."""
    norm = float(np.linalg.norm(delta))
    clipped = delta * min(1.0, clip_norm / max(norm, 1e-12))
    return clipped + np.random.default_rng().normal(0.0, noise_std, size=delta.shape), norm


class FederatedClientActor:
    """Built with the stage's client recipe (a dict), the model spec and the tokenizer's JSON;
    ``setup(index)`` makes it client ``index`` (again, on a replacement)."""

    def __init__(self, recipe: dict, spec, tokenizer_json: str):
        self.recipe_dict, self.spec, self.tokenizer_json = recipe, spec, tokenizer_json
        self.index: Optional[int] = None
        self.secagg: Optional[SecAggClient] = None
        self.delta: Optional[np.ndarray] = None

    def ready(self) -> dict:
        from llm_ray.align.rl_actors import actor_info

        return actor_info()

    def setup(self, index: int) -> dict:
        """Read and pack this client's shard, build its engine. Returns what the server may know:
        sample and document counts, the shard's topic histogram."""
        from tokenizers import Tokenizer

        from llm_ray.config import Recipe, from_dict
        from llm_ray.data.packing import pack_sequences
        from llm_ray.data.source import TokenBlockSource
        from llm_ray.data.text_files import list_text_files, read_documents
        from llm_ray.data.tokenizer import encode_documents, special_ids
        from llm_ray.train.device import detect_device

        recipe = from_dict(Recipe, self.recipe_dict)
        fed, seed = recipe.federated, recipe.train.seed
        dev = detect_device(recipe.parallel.cpus_per_worker)
        _single_process_group(dev.backend)
        tokenizer = Tokenizer.from_str(self.tokenizer_json)
        documents = read_documents(list_text_files(recipe.data.paths))
        mine = split_documents(len(documents), fed.clients, fed.split, fed.dirichlet_alpha, fed.topics, seed)[index]
        special = special_ids(tokenizer)
        sep = special.eos_id if special.eos_id is not None else special.sep_id
        ids = encode_documents(tokenizer, [documents[i] for i in mine])
        blocks = pack_sequences(ids, recipe.data.seq_len + 1, sep)
        if len(blocks) == 0:
            raise ValueError(f"client {index}: its {len(mine)} documents fill no block of data.seq_len "
                             f"{recipe.data.seq_len} (fewer clients or a larger federated.dirichlet_alpha)")
        self.index, self.recipe, self.device = index, recipe, dev
        self.source = TokenBlockSource(blocks, "causal_lm", seed + 1 + index)
        self.position = 0
        self._build_engine(dev)
        return {"index": index, "samples": int(len(blocks)), "documents": int(len(mine)),
                "topics": topic_histogram(mine, len(documents), fed.topics), "pid": os.getpid()}

    def _build_engine(self, dev) -> None:
        from llm_ray.privacy.objectives import Proximal
        from llm_ray.train.objective import CausalLM
        from llm_ray.train.parallelize import build_engine

        fed = self.recipe.federated
        objective = CausalLM()
        if fed.strategy == "fedprox":
            objective = Proximal(objective, fed.proximal_mu)
        self.objective = objective
        self.engine = build_engine(self.recipe, self.spec, objective, dev.is_gpu, "fp32")
        self.params = [p for p in self.engine.module.parameters() if p.requires_grad]

    # -- local training -------------------------------------------------------------------

    def _train(self, round_id: int, global_weights: np.ndarray, fail: bool) -> dict:
        """Local steps from the global weights; keeps the update (local - global) in float64."""
        import torch
        from torch.nn.utils import parameters_to_vector

        from llm_ray.train.loop import TrainStep

        started = time.perf_counter()
        start = torch.tensor(np.asarray(global_weights, dtype=np.float32), device=self.device.device)
        load_vector(self.params, start)
        if hasattr(self.objective, "anchor_at"):
            self.objective.anchor_at(self.params)
        t, fed = self.recipe.train, self.recipe.federated
        batches = self.source.iterate(self.position, 0, 1, t.micro_batch_size, self.recipe.grad_accum_steps, fed.local_steps)
        step = TrainStep(self.engine, batches, self.recipe, self.device.device, self.objective, {})
        losses = []
        for i in range(fed.local_steps):
            if fail and i == fed.local_steps // 2:
                os._exit(FAULT_EXIT_CODE)  # mid-round, after the key exchange: SecAgg must recover
            losses.append(step()[0])
        self.position += fed.local_steps * t.global_batch_size
        with torch.no_grad():
            self.delta = (parameters_to_vector(self.params).double() - start.double()).cpu().numpy()
        return {"loss": float(np.mean(losses)), "train_s": time.perf_counter() - started}

    def _payload(self, clients_in_sum: int) -> tuple[np.ndarray, dict]:
        """[w * update, w]: w = the shard's sample count (FedAvg's weights), or 1 with client DP
        (clipped, noised; equal weights keep one client's influence bounded)."""
        dp = self.recipe.federated.client_dp
        info: dict = {}
        if dp.enabled:
            std = dp.noise_multiplier * dp.clip_norm / np.sqrt(clients_in_sum)
            update, info["update_norm"] = clip_and_noise(self.delta, dp.clip_norm, std)
            return np.append(update, 1.0), info
        w = float(self.source.num_samples)
        info["update_norm"] = float(np.linalg.norm(self.delta))
        return np.append(self.delta * w, w), info

    def train(self, round_id: int, global_weights: np.ndarray, fail: bool = False) -> dict:
        """Plain FedAvg: the weighted update itself goes to the server."""
        out = self._train(round_id, global_weights, fail)
        payload, info = self._payload(self.recipe.federated.clients)
        return {**out, **info, "payload": payload}

    # -- secure aggregation (``privacy/secagg.py``), one call per protocol step --------------

    def advertise_keys(self, round_id: int) -> tuple[bytes, bytes]:
        self.secagg = SecAggClient(self.index, round_id)
        return self.secagg.public_keys()

    def share_keys(self, round_id: int, peers: dict, threshold: int) -> dict:
        return self.secagg.share_keys(peers, threshold)

    def receive_shares(self, round_id: int, ciphertexts: dict) -> int:
        self.secagg.receive_shares(ciphertexts)
        return len(ciphertexts)

    def train_masked(self, round_id: int, global_weights: np.ndarray, shared: list[int], fail: bool = False) -> dict:
        """Local steps, then the weighted update as fixed-point integers under the masks."""
        out = self._train(round_id, global_weights, fail)
        payload, info = self._payload(len(shared))
        started = time.perf_counter()
        masked = self.secagg.mask(encode(payload, self.recipe.federated.secure_aggregation.frac_bits), shared)
        return {**out, **info, "masked": masked, "mask_s": time.perf_counter() - started}

    def unmask_shares(self, round_id: int, alive: list[int], dropped: list[int]) -> dict:
        return self.secagg.unmask_shares(alive, dropped)
