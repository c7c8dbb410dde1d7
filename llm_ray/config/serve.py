"""Serve recipe (``llm-ray serve RECIPE``): the OpenAI-compatible endpoint on Ray Serve.

A serve recipe is a YAML file with one ``serve:`` section (``jobs/recipes/serve-smollm2.yaml``);
``--set serve.max_batch_size=16`` overrides a key. The same mapping is the ``args`` of the
application in a Serve config file (``jobs/serve_config.yaml``), so ``serve deploy`` and KubeRay
``serveConfigV2`` build exactly what ``llm-ray serve`` builds. No torch or ray import here.
"""

from __future__ import annotations

import dataclasses

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from llm_ray.config.loader import apply_overrides, check as _check, from_dict, load_yaml, RecipeError


@dataclass
class ServeAutoscalingConfig:
    """Ray Serve ``autoscaling_config``: replicas follow ongoing requests per replica."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0  # a replica batches this many sequences comfortably
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 60.0

    def __post_init__(self):
        _check(self.min_replicas >= 0, "min_replicas", "must be >= 0")
        _check(self.max_replicas >= 1, "max_replicas", "must be >= 1")
        _check(self.max_replicas >= self.min_replicas, "max_replicas", f"must be >= min_replicas ({self.min_replicas})")
        _check(self.target_ongoing_requests > 0, "target_ongoing_requests", "must be > 0")
        _check(self.upscale_delay_s >= 0, "upscale_delay_s", "must be >= 0")
        _check(self.downscale_delay_s >= 0, "downscale_delay_s", "must be >= 0")

    def to_serve(self) -> dict:
        """The dict Ray Serve's ``AutoscalingConfig`` takes (same field names)."""
        return dataclasses.asdict(self)


@dataclass
class ServeConfig:
    """One served model. ``num_replicas`` set = a fixed count; unset = ``autoscaling``."""

    model: str = "smollm2"  # model folder (llm-ray export / import) or a packaged short name
    model_name: str = ""  # id in /v1/models and the requests' "model"; "" = folder name / short name
    app_name: str = "llm"  # Serve application name
    route_prefix: str = "/"
    host: str = "127.0.0.1"  # HTTP proxy address (0.0.0.0 in a container)
    port: int = 8000
    num_replicas: Optional[int] = None
    autoscaling: ServeAutoscalingConfig = field(default_factory=ServeAutoscalingConfig)
    max_ongoing_requests: int = 64  # requests Serve sends to one replica before queueing at the proxy
    max_queued_requests: int = 64  # requests queued at each proxy; beyond: 503 (-1 = no limit)
    retry_after_s: float = 1.0  # Retry-After header of every 503
    max_batch_size: int = 32  # sequences decoded together in one forward pass
    max_queue: int = 64  # requests waiting in a replica for a batch slot; beyond: 503
    prefill_tokens_per_step: int = 2048  # prompt tokens prefilled between two decode steps
    prefix_cache_tokens: int = 8192  # KV of prompt prefixes kept for reuse (LRU, in tokens; 0 = off)
    request_timeout_s: float = 120.0  # per request, queueing included; beyond: 408
    stream_interval_ms: float = 50.0  # streamed tokens within this interval go in one chunk (first token at once)
    default_max_tokens: int = 256  # when a request gives no max_tokens (capped by the context)
    max_request_bytes: int = 4 * 1024 * 1024  # larger request bodies are answered 413
    api_keys: list[str] = field(default_factory=list)  # Bearer keys; empty (and no env, no hashes) = open
    api_keys_env: str = ""  # name of an env var with comma-separated keys (keeps keys out of YAML)
    api_key_sha256: list[str] = field(default_factory=list)  # keys stored hashed (hex sha256): what a recipe should hold
    rate_limit_per_minute: int = 0  # requests per API key (per client address when open) per replica; beyond: 429
    tls_certfile: str = ""  # PEM certificate (chain) of the HTTPS proxy; with tls_keyfile, Serve answers https only
    tls_keyfile: str = ""
    log_prompts: bool = False  # prompt text in the replica's log (off: request ids and users only)
    dtype: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where matmuls are fast in it
    use_gpu: Optional[bool] = None  # None: a GPU per replica when the cluster has GPUs
    cpus_per_replica: float = 1.0
    torch_threads: int = 0  # 0 = torch's default (all cores the replica sees)

    def __post_init__(self):
        _check(bool(self.model), "model", "must name a model folder or a packaged model (e.g. smollm2)")
        _check(bool(self.app_name), "app_name", "must not be empty")
        _check(self.route_prefix.startswith("/"), "route_prefix", f"must start with '/', got {self.route_prefix!r}")
        _check(1 <= self.port <= 65535, "port", f"must be in 1..65535, got {self.port}")
        _check(self.num_replicas is None or self.num_replicas >= 1, "num_replicas", "must be >= 1 or null (autoscaling)")
        _check(self.max_ongoing_requests >= 1, "max_ongoing_requests", "must be >= 1")
        _check(self.max_queued_requests == -1 or self.max_queued_requests >= 1, "max_queued_requests", "must be >= 1 or -1 (no limit)")
        _check(self.retry_after_s >= 0, "retry_after_s", "must be >= 0")
        _check(self.max_batch_size >= 1, "max_batch_size", "must be >= 1")
        _check(self.max_queue >= 0, "max_queue", "must be >= 0")
        _check(self.prefill_tokens_per_step >= 1, "prefill_tokens_per_step", "must be >= 1")
        _check(self.prefix_cache_tokens >= 0, "prefix_cache_tokens", "must be >= 0 (0 = off)")
        _check(self.request_timeout_s > 0, "request_timeout_s", "must be > 0")
        _check(self.stream_interval_ms >= 0, "stream_interval_ms", "must be >= 0 (0 = every token as it comes)")
        _check(self.default_max_tokens >= 1, "default_max_tokens", "must be >= 1")
        _check(self.max_request_bytes >= 1024, "max_request_bytes", "must be >= 1024")
        _check(all(isinstance(k, str) and k for k in self.api_keys), "api_keys", "must be non-empty strings")
        _check(all(isinstance(h, str) and len(h) == 64 and all(c in "0123456789abcdef" for c in h.lower()) for h in self.api_key_sha256),
               "api_key_sha256", "must be hex sha256 digests (64 characters): python3 -c \"import hashlib; print(hashlib.sha256(b'KEY').hexdigest())\"")
        _check(self.rate_limit_per_minute >= 0, "rate_limit_per_minute", "must be >= 0 (0 = no limit)")
        _check(bool(self.tls_certfile) == bool(self.tls_keyfile), "tls_keyfile", "TLS needs both tls_certfile and tls_keyfile")
        for key in ("tls_certfile", "tls_keyfile"):
            _check(not getattr(self, key) or os.path.isfile(getattr(self, key)), key, f"{getattr(self, key)} is not a file")
        _check(self.cpus_per_replica >= 0, "cpus_per_replica", "must be >= 0")
        _check(self.torch_threads >= 0, "torch_threads", "must be >= 0 (0 = torch's default)")

    @property
    def served_name(self) -> str:
        """The model id clients send: ``model_name``, else the short name or folder name."""
        if self.model_name:
            return self.model_name
        return Path(self.model.rstrip("/")).name or self.model

    def resolved_api_keys(self) -> list[str]:
        """``api_keys`` plus those in the env var ``api_keys_env`` (read where the replica runs)."""
        keys = list(self.api_keys)
        if self.api_keys_env:
            keys += [k.strip() for k in os.environ.get(self.api_keys_env, "").split(",") if k.strip()]
        return keys

    def api_key_hashes(self) -> list[str]:
        """Every accepted key as its sha256 hex digest: the replica keeps only these."""
        import hashlib

        return sorted({hashlib.sha256(k.encode()).hexdigest() for k in self.resolved_api_keys()} |
                      {h.lower() for h in self.api_key_sha256})

    @property
    def scheme(self) -> str:
        return "https" if self.tls_certfile else "http"

    def http_options(self) -> dict:
        """Serve's proxy options: host, port and, with TLS, the certificate and key."""
        opts: dict = {"host": self.host, "port": self.port}
        if self.tls_certfile:
            opts.update(ssl_certfile=os.path.abspath(self.tls_certfile), ssl_keyfile=os.path.abspath(self.tls_keyfile))
        return opts

    def deployment_options(self) -> dict:
        """Ray Serve deployment options: replicas or autoscaling, limits, backpressure, resources."""
        opts: dict = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": self.retry_after_s},
        }
        if self.num_replicas is not None:
            opts["num_replicas"] = self.num_replicas
        else:
            opts["autoscaling_config"] = self.autoscaling.to_serve()
        return opts


def load_serve_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> ServeConfig:
    """A serve recipe (YAML with a ``serve:`` section) plus ``--set serve.key=value`` overrides."""
    data = load_yaml(path) if path else {}
    data = apply_overrides(data, list(overrides or []))
    unknown = sorted(set(data) - {"serve"})
    if unknown:
        raise RecipeError(unknown[0], "unknown section in a serve recipe (known: serve)")
    section = data.get("serve") or {}
    if not isinstance(section, dict):
        raise RecipeError("serve", "must be a mapping")
    return from_dict(ServeConfig, section, "serve")
