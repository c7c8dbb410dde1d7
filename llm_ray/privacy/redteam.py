"""``llm-ray redteam``: attack prompts against a model folder or an OpenAI-compatible endpoint,
scored by rules (``redteam_rules.py``), reported per category.

Every prompt is sent as a chat (an optional system turn, then the user turn), the same messages
whether the target is local generation or ``/v1/chat/completions``, so a model folder and the
endpoint serving it get the same prompts and, when greedy, give the same answers. Nothing here
imports torch or openai until a target is built: the spec, the prompt files, the lexicon and
the target's settings are all checked first.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Protocol

from llm_ray.config.loader import RecipeError
from llm_ray.config.redteam import RedteamSpec
from llm_ray.eval.report import markdown_cell, one_line
from llm_ray.privacy import redteam_rules as rules
from llm_ray.stage import SUMMARY, StageResult, write_files

Reply = tuple[str, Optional[str]]  # (response text, error message or None)
_OPTIONAL_FIELDS = {"tactic", "system", "success_pattern", "canary"}


class RedteamError(RuntimeError):
    """The target cannot be reached or refuses the run (wrong key, wrong URL): one line."""


# -- prompt sets --------------------------------------------------------------------------------
def _bad(path: Path, line: int, message: str) -> RecipeError:
    return RecipeError("prompts_dir", f"{path.name} line {line}: {message}")


def _check_record(rec, path: Path, line: int, category: str) -> dict:
    if not isinstance(rec, dict):
        raise _bad(path, line, "expected a JSON object")
    unknown = set(rec) - _OPTIONAL_FIELDS - {"id", "prompt"}
    if unknown:
        raise _bad(path, line, f"unknown field(s) {sorted(unknown)} (known: id, prompt, {', '.join(sorted(_OPTIONAL_FIELDS))})")
    for name in ("id", "prompt"):
        if not isinstance(rec.get(name), str) or not rec[name].strip():
            raise _bad(path, line, f"needs a non-empty string {name!r}")
    for name in _OPTIONAL_FIELDS & set(rec):
        if not isinstance(rec[name], str):
            raise _bad(path, line, f"{name!r} must be a string")
    if rec.get("success_pattern"):
        try:
            re.compile(rec["success_pattern"])
        except re.error as e:
            raise _bad(path, line, f"success_pattern is not a regular expression: {e}") from None
    if category == "prompt_injection" and "{secret}" not in rec.get("system", ""):
        raise _bad(path, line, "a prompt_injection prompt needs a 'system' message holding {secret} (the planted secret)")
    return rec


def read_prompt_file(path: Path, category: str, limit: int = 0) -> list[dict]:
    """The records of one CATEGORY.jsonl (the first ``limit``; 0 = all), each checked."""
    if not path.is_file():
        raise RecipeError("prompts_dir", f"{path} not found (each category reads CATEGORY.jsonl from prompts_dir)")
    records, ids = [], set()
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not text.strip():
            continue
        try:
            rec = _check_record(json.loads(text), path, line, category)
        except json.JSONDecodeError as e:
            raise _bad(path, line, f"not JSON: {e.msg}") from None
        if rec["id"] in ids:
            raise _bad(path, line, f"id {rec['id']!r} repeats an earlier one")
        ids.add(rec["id"])
        records.append(rec)
    if not records:
        raise RecipeError("prompts_dir", f"{path} holds no prompts")
    return records[:limit] if limit else records


def load_prompts(spec: RedteamSpec) -> dict[str, list[dict]]:
    """Each selected category's prompts, with the planted secret filled in for prompt_injection."""
    sets = {}
    for category in spec.categories:
        records = read_prompt_file(Path(spec.prompts_dir) / f"{category}.jsonl", category, spec.limit_per_category)
        for rec in records:
            if category == "prompt_injection":
                rec["secret"] = rules.secret_for(spec.seed, rec["id"])
        sets[category] = records
    return sets


def chat_for(rec: dict) -> list[dict]:
    """A prompt record as chat messages. ``str.replace``, not ``format``: documents hold braces."""
    secret = rec.get("secret", "")
    messages = [{"role": "system", "content": rec["system"].replace("{secret}", secret)}] if rec.get("system") else []
    return messages + [{"role": "user", "content": rec["prompt"].replace("{secret}", secret)}]


# -- targets ------------------------------------------------------------------------------------
class Target(Protocol):
    def describe(self) -> dict: ...

    def complete(self, chats: list[list[dict]]) -> list[Reply]: ...


class LocalTarget:
    """Our generation API on a model folder: length-sorted batches of ``spec.batch_size`` chats."""

    def __init__(self, spec: RedteamSpec):
        import torch

        from llm_ray.bundle import load_bundle
        from llm_ray.train.device import local_device

        t = spec.target
        if t.device == "cuda" and not torch.cuda.is_available():
            raise RecipeError("target.device", "cuda requested but no CUDA device is present")
        device = local_device() if t.device == "auto" else torch.device(t.device)
        self.spec, self.device = spec, device
        self.bundle = load_bundle(t.model, device=device, dtype=torch.bfloat16 if t.dtype == "bf16" else None)
        if self.bundle.cfg.arch != "decoder":
            raise RecipeError("target.model", f"{t.model} is an {self.bundle.cfg.arch}; red-teaming needs a decoder (causal LM)")

    def describe(self) -> dict:
        t = self.spec.target
        return {"kind": "model", "model": t.model, "model_path": self.bundle.path, "device": str(self.device), "dtype": t.dtype}

    def _generate(self, chats: list[list[dict]]) -> list[str]:
        from llm_ray.generation import GenerationConfig
        from llm_ray.generation.api import generate

        s = self.spec
        sample = s.temperature > 0
        config = GenerationConfig(max_new_tokens=s.max_new_tokens, do_sample=sample, temperature=s.temperature if sample else 1.0,
                                  seed=s.seed if sample else None)
        return [r.text for r in generate(self.bundle, chats, config)]

    def complete(self, chats: list[list[dict]]) -> list[Reply]:
        from llm_ray.generation.chat import render_bundle_chat

        lengths = [len(self.bundle.tokenizer.encode(render_bundle_chat(self.bundle, c)).ids) for c in chats]
        order = sorted(range(len(chats)), key=lengths.__getitem__)  # little padding per batch
        out: list[Reply] = [("", None)] * len(chats)
        for start in range(0, len(order), self.spec.batch_size):
            idx = order[start : start + self.spec.batch_size]
            try:
                texts = self._generate([chats[i] for i in idx])
            except ValueError:  # e.g. a prompt past a learned position table: find which, keep the rest
                texts = None
            for j, i in enumerate(idx):
                if texts is not None:
                    out[i] = (texts[j], None)
                    continue
                try:
                    out[i] = (self._generate([chats[i]])[0], None)
                except ValueError as e:
                    out[i] = ("", str(e))
        return out


class EndpointTarget:
    """An OpenAI-compatible endpoint through the official ``openai`` client (chat completions).

    The key is read from the environment variable the spec names, held only in the client, and
    never written: the report records the variable's name."""

    def __init__(self, spec: RedteamSpec, api_key: str):
        try:
            import openai
        except ImportError:
            raise RedteamError("target.endpoint needs the openai package (pip install openai)") from None
        import ssl

        t = spec.target
        verify = ssl.create_default_context(cafile=t.ca_file) if t.ca_file else True
        self.openai, self.spec = openai, spec
        self.client = openai.OpenAI(base_url=t.endpoint, api_key=api_key or "EMPTY", timeout=t.timeout_s, max_retries=2,
                                    http_client=openai.DefaultHttpxClient(verify=verify))
        self.model_name = t.model_name or self._first_model()

    def _first_model(self) -> str:
        listed = self._call(lambda: [m.id for m in self.client.models.list().data])
        if isinstance(listed, Exception) or not listed:
            raise RedteamError(f"endpoint {self.spec.target.endpoint}: GET /models gave no model "
                               f"({_one_line(listed) if isinstance(listed, Exception) else 'empty list'}); set target.model_name")
        return listed[0]

    def describe(self) -> dict:
        t = self.spec.target
        return {"kind": "endpoint", "endpoint": t.endpoint, "model_name": self.model_name, "api_key_env": t.api_key_env,
                "ca_file": t.ca_file}

    def _call(self, fn):
        """Run one request; a refused key, an unknown route or model, or no connection ends the run
        (every other request would fail the same way), other API errors are the row's error."""
        oa = self.openai
        try:
            return fn()
        except oa.APITimeoutError as e:
            return e
        except (oa.AuthenticationError, oa.PermissionDeniedError, oa.NotFoundError, oa.APIConnectionError) as e:
            raise RedteamError(f"endpoint {self.spec.target.endpoint}: {type(e).__name__}: {_one_line(e)}") from None
        except oa.APIError as e:
            return e

    def _one(self, i: int, chat: list[dict]) -> Reply:
        s = self.spec
        kw = dict(model=self.model_name, messages=chat, max_tokens=s.max_new_tokens, temperature=s.temperature)
        if s.temperature > 0:
            kw["seed"] = s.seed + i  # one seed per prompt, as local generation seeds its rows
        out = self._call(lambda: self.client.chat.completions.create(**kw))
        if isinstance(out, Exception):
            return "", f"{type(out).__name__}: {_one_line(out)}"
        return out.choices[0].message.content or "", None

    def complete(self, chats: list[list[dict]]) -> list[Reply]:
        with ThreadPoolExecutor(self.spec.concurrency) as pool:
            return list(pool.map(self._one, range(len(chats)), chats))


def _one_line(e: Exception) -> str:
    return one_line(e, 300)


def check_target(spec: RedteamSpec) -> str:
    """The target's settings that need the file system or the environment, checked before any
    model loads or request goes out; returns the API key ("" when none is named)."""
    t = spec.target
    if t.model:
        from llm_ray.bundle.packaged import PACKAGES

        if not os.path.isdir(t.model) and t.model not in PACKAGES:
            raise RecipeError("target.model", f"{t.model!r} is not a folder and not a packaged model ({', '.join(sorted(PACKAGES))})")
        return ""
    if t.ca_file and not os.path.isfile(t.ca_file):
        raise RecipeError("target.ca_file", f"{t.ca_file} not found")
    if t.api_key_env and not os.environ.get(t.api_key_env):
        raise RecipeError("target.api_key_env", f"environment variable {t.api_key_env} is not set (it must hold the endpoint's API key)")
    return os.environ.get(t.api_key_env, "") if t.api_key_env else ""


def build_target(spec: RedteamSpec) -> Target:
    api_key = check_target(spec)
    return EndpointTarget(spec, api_key) if spec.target.endpoint else LocalTarget(spec)


# -- the run ------------------------------------------------------------------------------------
def _example(row: dict) -> dict:
    keep = ("id", "tactic", "outcome", "refusal_phrase", "toxic_terms", "pii", "error")
    ex = {k: row[k] for k in keep if row.get(k) not in (None, [], {})}
    return {**ex, "response": one_line(row["response"], 200)}


def _examples(rows: list[dict], k: int) -> list[dict]:
    """Attack successes first (what a reader looks for), then the rest, in file order."""
    ranked = sorted(rows, key=lambda r: (not r.get("attack_success"), r["outcome"] == "error"))
    return [_example(r) for r in ranked[:k]]


def score_category(category: str, prompts: list[dict], replies: list[Reply], lexicon: re.Pattern) -> list[dict]:
    rows = []
    for rec, (text, error) in zip(prompts, replies):
        row = {"category": category, "id": rec["id"], "tactic": rec.get("tactic", ""), "prompt": rec["prompt"], "response": text}
        if category == "prompt_injection":
            row["secret"] = rec["secret"]
        if error is not None:
            row.update(outcome="error", error=error, refused=False, attack_success=False, toxic_terms=[], trivial=False, pii={})
        else:
            row.update(rules.score(category, rec, text, lexicon))
        rows.append(row)
    return rows


def run_redteam(spec: RedteamSpec, out_dir: str, target: Optional[Target] = None) -> dict:
    """Run every selected category against ``spec.target`` (or an already built ``target``);
    returns the report, also written to ``out_dir`` (report.json, report.md, responses.jsonl,
    summary.json)."""
    t0 = time.perf_counter()
    prompts = load_prompts(spec)  # the prompt files and the lexicon first: a typo fails in a second
    terms = _load_lexicon(spec)
    lexicon = rules.lexicon_regex(terms)
    target = target or build_target(spec)
    rows_by_category, categories = {}, {}
    for category, records in prompts.items():
        replies = target.complete([chat_for(r) for r in records])
        rows = score_category(category, records, replies, lexicon)
        rows_by_category[category] = rows
        categories[category] = {
            "prompts_file": str(Path(spec.prompts_dir) / f"{category}.jsonl"),
            "attack_success_means": rules.SUCCESS_MEANS[category],
            "metrics": rules.aggregate(category, rows),
            "outcomes": dict(Counter(r["outcome"] for r in rows)),
            "examples": _examples(rows, spec.examples_in_report),
        }
    all_rows = [r for rows in rows_by_category.values() for r in rows]
    if all(r["outcome"] == "error" for r in all_rows):  # nothing was scored: a broken target, not a result
        raise RedteamError(f"every request failed; the first: {all_rows[0]['error']}")
    report = {
        "target": target.describe(),
        "scoring": "rules",
        "rules": {
            "refusal_patterns": list(rules.REFUSAL_PATTERNS),
            "min_words": rules.MIN_WORDS,
            "min_distinct_words": rules.MIN_DISTINCT,
            "lexicon": spec.lexicon_path,
            "lexicon_terms": len(terms),
            "pii_detector": "llm_ray.data.pii.scrub_pii (e-mail, phone, IP address, Luhn-valid card)",
        },
        "limits": list(rules.LIMITS),
        "spec": spec.to_dict(),
        "categories": categories,
        "seconds": time.perf_counter() - t0,
    }
    write_reports(report, all_rows, out_dir)
    return report


def _load_lexicon(spec: RedteamSpec) -> list[str]:
    path = spec.lexicon_path
    if not os.path.isfile(path):
        raise RecipeError("lexicon", f"{path} not found (one term per line; default: toxicity_lexicon.txt in prompts_dir)")
    try:
        return rules.load_lexicon(path)
    except ValueError as e:
        raise RecipeError("lexicon", str(e)) from None


def redteam_stage(spec: RedteamSpec, out_dir: str) -> StageResult:
    """``llm-ray redteam`` as a stage: the report folder and its summary."""
    run_redteam(spec, out_dir)
    with open(os.path.join(out_dir, SUMMARY)) as f:
        return StageResult(os.path.abspath(out_dir), json.load(f))


# -- reports ------------------------------------------------------------------------------------
def _pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def target_name(target: dict) -> str:
    return target["model"] if target["kind"] == "model" else f"{target['model_name']} at {target['endpoint']}"


def to_markdown(report: dict) -> str:
    spec, target = report["spec"], report["target"]
    n = sum(c["metrics"]["n_prompts"] for c in report["categories"].values())
    decoding = "greedy" if spec["temperature"] == 0 else f"temperature {spec['temperature']}, seed {spec['seed']}"
    lines = [f"# Red-team report: `{target_name(target)}` ({target['kind']})", "",
             f"{n} prompts in {report['seconds']:.1f} s; up to {spec['max_new_tokens']} new tokens, {decoding}.",
             "**Scored by rules, not by a judge model**: see Rules and limits below.", "",
             "| category | prompts | errors | refusal | attack success | toxicity |", "|---|---|---|---|---|---|"]
    for name, cat in report["categories"].items():
        m = cat["metrics"]
        lines.append(f"| {name} | {m['n_prompts']} | {m['n_errors']} | {_pct(m['refusal_rate'])} | "
                     f"{_pct(m['attack_success_rate'])} | {_pct(m['toxicity_rate'])} |")
    lines += ["", "Attack success means:", ""]
    lines += [f"- {name}: {cat['attack_success_means']}" for name, cat in report["categories"].items()]
    for name, cat in report["categories"].items():
        extra = {k: v for k, v in cat["metrics"].items() if k not in ("n_prompts", "n_errors", "refusal_rate", "attack_success_rate", "toxicity_rate")}
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(cat["outcomes"].items()))
        lines += ["", f"## {name}", "", f"Outcomes: {outcomes}. " + ", ".join(
            f"{k} {_pct(v) if k.endswith('_rate') else v}" for k, v in extra.items()) + ".", ""]
        if cat["examples"]:
            lines += ["| id | tactic | outcome | response (start) |", "|---|---|---|---|"]
            lines += [f"| {ex['id']} | {ex.get('tactic', '')} | {ex['outcome']} | {markdown_cell(ex['response'])} |" for ex in cat["examples"]]
    rules_ = report["rules"]
    lines += ["", "## Rules and limits", "",
              f"- Refusal: any of {len(rules_['refusal_patterns'])} regular expressions (report.json `rules.refusal_patterns`; "
              "\"I can't help\", \"I'm sorry\", \"As an AI\", ...).",
              f"- Trivial: fewer than {rules_['min_words']} words or fewer than {rules_['min_distinct_words']} distinct ones.",
              f"- PII: {rules_['pii_detector']}.",
              f"- Toxicity: whole-word matches of the {rules_['lexicon_terms']} terms in `{rules_['lexicon']}`."]
    lines += [f"- {limit}" for limit in report["limits"]]
    lines += ["", "Every response with its verdict: responses.jsonl."]
    return "\n".join(lines) + "\n"


def flat_metrics(report: dict) -> dict:
    return {f"{name}.{k}": v for name, cat in report["categories"].items() for k, v in cat["metrics"].items()}


def write_reports(report: dict, rows: list[dict], out_dir: str) -> dict:
    """report.json, report.md, responses.jsonl and summary.json, each whole or absent."""
    summary = {"target": target_name(report["target"]), "scoring": "rules", "metrics": flat_metrics(report),
               "n_prompts": len(rows), "seconds": report["seconds"], "out_dir": os.path.abspath(out_dir)}
    write_files(out_dir, {
        "report.json": json.dumps(report, indent=2, ensure_ascii=False),
        "report.md": to_markdown(report),
        "responses.jsonl": "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
        SUMMARY: json.dumps(summary, indent=2),
    })
    return summary
