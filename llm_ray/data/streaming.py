"""Stream packed shards from object storage into training, with exact resume.

Ray Data iterators cannot resume mid-epoch (ray-project/ray#37633) and ``streaming_split``
hands rows to whichever consumer asks first, so neither fixes which rank sees which sample.
Here the global order is a pure function of (seed, epoch, shard sizes) — shards shuffled per
epoch, rows shuffled inside each shard, mosaicml/streaming style — and a sample's global
position decides its rank exactly as for in-memory data (``sampler.py``). Each worker then runs
a Ray Data pipeline over *its own* remaining micro-batch indices: an actor reads and caches the
shards those positions fall in, Ray Data prefetches ahead of the training step, and the data
position in the checkpoint is all a restart needs.

Sealed shards (``prepare.encrypt``) are decrypted in the reader's memory with the key of its own
process's environment: the key never travels with the source (Ray pickles it to every worker
and may spill objects to disk), only the path of a key file does, as for checkpoints.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Iterator, Optional

import numpy as np

from llm_ray.config.loader import RecipeError
from llm_ray.data.packing import MaskingSpec, causal_lm_example, masked_lm_example
from llm_ray.data.shards import read_manifest, read_shard_columns, shard_key
from llm_ray.encryption import key_file_env
from llm_ray.storage import resolve_storage


class ShardOrder:
    """Global position -> (shard, row, sample id), shuffled per epoch from a seed."""

    def __init__(self, counts: list[int], seed: int):
        self.counts = np.asarray(counts, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.counts)[:-1]])  # sample id of row 0
        self.total = int(self.counts.sum())
        self.seed = seed
        if self.total == 0:
            raise ValueError("the prepared dataset has no sequences")

    def _shard_order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))

    def _row_order(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.counts[shard]))

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard index, row inside the shard) of each global position."""
        positions = np.asarray(positions, dtype=np.int64)
        shards = np.empty_like(positions)
        rows = np.empty_like(positions)
        for i, p in enumerate(positions):
            epoch, offset = divmod(int(p), self.total)
            order = self._shard_order(epoch)
            ends = np.cumsum(self.counts[order])
            slot = int(np.searchsorted(ends, offset, side="right"))
            shard = int(order[slot])
            within = offset - (int(ends[slot]) - int(self.counts[shard]))
            shards[i], rows[i] = shard, self._row_order(epoch, shard)[within]
        return shards, rows


class _MicroBatchReader:
    """Ray Data UDF (runs in an actor): micro-batch index -> its rows, with a small shard cache."""

    def __init__(self, source: "ShardSource", start: int, dp_rank: int, dp_size: int, micro: int, accum: int):
        self.source, self.start = source, start
        self.dp_rank, self.dp_size, self.micro, self.accum = dp_rank, dp_size, micro, accum
        self.out = resolve_storage(source.uri, source.s3_endpoint)
        self.key = shard_key(source.manifest, source.uri)  # this process's key (None: plaintext)
        self.cache: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()

    def _shard(self, index: int) -> dict[str, np.ndarray]:
        if index not in self.cache:
            self.cache[index] = read_shard_columns(self.out, self.source.shard_names[index], self.source.columns, self.key)
            while len(self.cache) > 4:  # a position range rarely spans more than two shards
                self.cache.popitem(last=False)
        self.cache.move_to_end(index)
        return self.cache[index]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows: dict[str, list] = {"input_ids": [], "labels": [], "sample_ids": []}
        if self.source.doc_attention_mask:
            rows["segment_ids"] = []
        global_batch = self.micro * self.dp_size * self.accum
        for k in batch["id"]:
            step, m = divmod(int(k), self.accum)
            first = self.start + step * global_batch + m * self.dp_size * self.micro + self.dp_rank * self.micro
            mb = self.source.rows(np.arange(first, first + self.micro), self._shard)
            for key in rows:
                rows[key].append(mb[key])
        return {key: np.stack(value) for key, value in rows.items()}


class ShardSource:
    """A ``TrainingSource`` over a prepared dataset (local or s3://)."""

    def __init__(self, uri: str, objective: str, seed: int, masking: Optional[MaskingSpec] = None,
                 s3_endpoint: Optional[str] = None, doc_attention_mask: bool = False):
        self.uri, self.s3_endpoint = uri, s3_endpoint
        manifest = read_manifest(resolve_storage(uri, s3_endpoint))
        if manifest is None:
            raise FileNotFoundError(f"data.shards: no manifest.json under {uri} (run `llm-ray data prepare` first)")
        self.manifest = manifest
        shard_key(manifest, uri)  # sealed shards and no key (or another): one line here, before Ray
        if doc_attention_mask and not manifest.get("keep_doc_boundaries"):
            raise RecipeError("data.doc_attention_mask", f"the shards under {uri} hold no document boundaries "
                                                         "(prepare them with prepare.keep_doc_boundaries: true)")
        # Per-token document ids ride along as ``segment_ids`` (B, T) for block-diagonal attention.
        self.doc_attention_mask = doc_attention_mask
        self.columns = ["input_ids", "doc_index"] if doc_attention_mask else ["input_ids"]
        self.shard_names = [s["name"] for s in manifest["shards"]]
        self.order = ShardOrder([s["num_sequences"] for s in manifest["shards"]], seed)
        self.objective, self.seed, self.masking = objective, seed, masking
        self.num_samples = self.order.total

    def rows(self, positions: np.ndarray, load_shard) -> dict[str, np.ndarray]:
        shards, rows = self.order.locate(positions)
        data = [load_shard(int(s)) for s in shards]
        blocks = np.stack([d["input_ids"][int(r)] for d, r in zip(data, rows)])
        if self.objective == "causal_lm":
            out = causal_lm_example(blocks)
        else:
            out = masked_lm_example(blocks, positions, self.masking, self.seed)
        if self.doc_attention_mask:
            docs = np.stack([d["doc_index"][int(r)] for d, r in zip(data, rows)]).astype(np.int64)
            out["segment_ids"] = docs[:, : out["input_ids"].shape[1]]  # (B, T): the inputs' documents
        out["sample_ids"] = self.order.first[shards] + rows
        return out

    def micro_batch(self, start: int, micro_step: int, dp_rank: int, dp_size: int, micro: int) -> dict[str, np.ndarray]:
        """Random access without Ray Data (tests, tools); training uses ``iterate``."""
        reader = _MicroBatchReader(self, start, dp_rank, dp_size, micro, accum=micro_step + 1)
        out = reader({"id": np.array([micro_step])})
        return {key: value[0] for key, value in out.items()}

    def iterate(self, start: int, dp_rank: int, dp_size: int, micro: int, accum: int, steps: int) -> Iterator[dict]:
        """This rank's micro batches for ``steps`` optimizer steps from data position ``start``."""
        import ray.data

        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # the order is the contract
        ctx.enable_progress_bars = False  # one bar per worker would flood the driver's console
        # Train workers hold the cluster's CPUs; a pipeline asking for one more would wait
        # forever. from_items needs no read tasks, and the reader (mostly I/O and copies) asks
        # for no CPU slot.
        ds = ray.data.from_items([{"id": k} for k in range(steps * accum)]).map_batches(
            _MicroBatchReader,
            fn_constructor_args=(self, start, dp_rank, dp_size, micro, accum),
            batch_size=1,
            concurrency=1,
            num_cpus=0,
            batch_format="numpy",
            **self._key_env(),
        )
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy", prefetch_batches=4):
            yield {key: value[0] for key, value in batch.items()}

    def _key_env(self) -> dict:
        """The reader actor's runtime env for sealed shards: the key file's path (inside a Train
        worker it is inherited already; a reader started by the driver needs it given)."""
        env = key_file_env() if self.manifest.get("encrypted") else {}
        return {"runtime_env": {"env_vars": env}} if env else {}
