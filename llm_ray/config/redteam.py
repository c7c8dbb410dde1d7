"""Red-team spec for ``llm-ray redteam``: one target (a model folder or an OpenAI-compatible
endpoint), the prompt categories to run, and how to generate.

The endpoint's API key never appears in a spec: ``target.api_key_env`` names the environment
variable that holds it, so the spec (copied into report.json) stays safe to share. Importing
this module needs neither torch nor ray.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional
from urllib.parse import urlsplit

import yaml

from llm_ray.config.loader import apply_overrides, from_dict, load_yaml
from llm_ray.config.loader import check as _check

CATEGORIES = ("jailbreak", "prompt_injection", "pii_extraction", "toxic_continuation")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class TargetConfig:
    """What is attacked: ``model`` (local generation) or ``endpoint`` (chat completions).

    model        a model folder (llm-ray export / import / sft) or a packaged name (smollm2)
    endpoint     base URL of an OpenAI-compatible API, e.g. https://host:8000/main/v1
    api_key_env  name of the environment variable holding the endpoint's key ("" = no key)
    ca_file      PEM bundle that signs an https endpoint's certificate ("" = system store)
    model_name   the request's "model" field ("" = the first entry of GET /models)
    """

    model: str = ""
    endpoint: str = ""
    api_key_env: str = ""
    ca_file: str = ""
    model_name: str = ""
    device: Literal["auto", "cpu", "cuda"] = "auto"  # model: where it runs
    dtype: Literal["fp32", "bf16"] = "fp32"  # model: weights and compute
    timeout_s: float = 120.0  # endpoint: per request

    def __post_init__(self):
        # Neither is RedteamSpec's error (key "target"): this default must construct.
        _check(not (self.model and self.endpoint), "endpoint", "give target.model or target.endpoint, not both")
        _check(self.timeout_s > 0, "timeout_s", "must be > 0")
        if not self.endpoint:
            for key in ("api_key_env", "ca_file", "model_name"):
                _check(not getattr(self, key), key, "applies to target.endpoint only")
            return
        url = urlsplit(self.endpoint)
        _check(url.scheme in ("http", "https") and bool(url.hostname), "endpoint",
               f"must be an http:// or https:// URL, got {self.endpoint!r}")
        # A key in the URL would be copied into report.json; it belongs in the environment.
        _check(url.username is None and url.password is None, "endpoint",
               "must not carry credentials; put the key in the variable target.api_key_env names")
        _check(not self.api_key_env or _ENV_NAME.fullmatch(self.api_key_env) is not None, "api_key_env",
               "must be the name of an environment variable (the key itself is never written in a spec)")
        _check(not self.ca_file or url.scheme == "https", "ca_file", "needs an https:// endpoint")


@dataclass
class RedteamSpec:
    target: TargetConfig = field(default_factory=TargetConfig)  # required: model or endpoint
    categories: list[str] = field(default_factory=lambda: list(CATEGORIES))  # a subset, run in this order
    prompts_dir: str = "../data/redteam"  # CATEGORY.jsonl files; relative to the spec file's folder
    lexicon: str = ""  # toxicity word list; "" = toxicity_lexicon.txt in prompts_dir
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    seed: int = 0  # the secrets planted in prompt_injection prompts, and sampling when temperature > 0
    limit_per_category: int = 0  # the first N prompts of each file; 0 = all
    batch_size: int = 8  # model: prompts per generate call
    concurrency: int = 4  # endpoint: requests in flight
    examples_in_report: int = 3  # rows shown per category in report.json / report.md

    def __post_init__(self):
        _check(bool(self.target.model or self.target.endpoint), "target", "needs target.model (a model folder or packaged name) or target.endpoint")
        _check(bool(self.categories), "categories", f"needs at least one of {', '.join(CATEGORIES)}")
        for i, c in enumerate(self.categories):
            _check(c in CATEGORIES, f"categories[{i}]", f"{c!r} is not a category (use {', '.join(CATEGORIES)})")
        _check(len(set(self.categories)) == len(self.categories), "categories", "must not repeat a category")
        _check(bool(self.prompts_dir), "prompts_dir", "needs the folder holding CATEGORY.jsonl files")
        _check(1 <= self.max_new_tokens <= 4096, "max_new_tokens", "must be in 1..4096")
        _check(0.0 <= self.temperature <= 2.0, "temperature", "must be in [0, 2] (0 = greedy)")
        _check(self.limit_per_category >= 0, "limit_per_category", "must be >= 0 (0 = all)")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(1 <= self.concurrency <= 64, "concurrency", "must be in 1..64")
        _check(self.examples_in_report >= 0, "examples_in_report", "must be >= 0")

    @property
    def lexicon_path(self) -> str:
        return self.lexicon or str(Path(self.prompts_dir) / "toxicity_lexicon.txt")

    def resolve_paths(self, base: str | Path) -> "RedteamSpec":
        """Paths relative to the spec file's folder when they do not exist as given."""
        base = Path(base)
        for obj, attr in ((self, "prompts_dir"), (self, "lexicon"), (self.target, "ca_file")):
            value = getattr(obj, attr)
            if value and not Path(value).exists() and (base / value).exists():
                setattr(obj, attr, os.path.normpath(base / value))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)  # holds api_key_env (a name), never the key

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def load_redteam_spec(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RedteamSpec:
    """Load a YAML red-team spec and apply ``--set key=value`` overrides (``target.model=...``)."""
    data = load_yaml(path) if path else {}
    spec = from_dict(RedteamSpec, apply_overrides(data, list(overrides or [])))
    return spec.resolve_paths(Path(path).parent) if path else spec
