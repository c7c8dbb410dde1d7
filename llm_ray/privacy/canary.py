"""``llm-ray canary SPEC --out DIR``: canary exposure (Carlini et al. 2019, "The Secret Sharer").

Random secrets in a PII-shaped template ("my phone number is 020 7946 {secret}") are inserted
``repeats`` times each, as documents of their own at seeded random document boundaries, into
a copy of a training recipe's corpus. Each arm trains that recipe with the same model, steps
and seed (``plain``; ``dp``: privacy.dp on; ``scrubbed``: the planted corpus through the PII
scrubber first, so the canaries become ``<PHONE>``; ``dp_scrubbed``: both), and each canary's
exposure is measured under the trained model:

    exposure = log2 |R| - log2 rank,

R the space of all 10^d secrets, rank the canary's 1-based place among all of them ordered by
the model's NLL of the secret's tokens after the template's prefix (ties at their mid rank).
Ranks are exact (every candidate scored, batched) when |R| <= ``exposure.exact_max``; beyond it
they are estimated as Carlini et al. do (sec. 4.3): a **skew-normal** fitted to the NLLs of
random candidates gives rank ≈ |R| · CDF(canary's NLL). A random rank has expected exposure
log2 N - log2(N!)/N ≈ log2 e ≈ 1.44 bits; the honest baseline is the exposure of ``controls``,
fresh secrets never inserted, under the same model.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from llm_ray.config import PIIConfig, Recipe, RecipeError, load_recipe
from llm_ray.config.canary import SECRET, CanaryConfig, CanarySpec, ExposureConfig
from llm_ray.stage import StageResult, write_summary

Scorer = Callable[[Sequence[str]], np.ndarray]  # secrets -> (N,) NLL in nats of each secret


def _log(msg: str) -> None:
    print(f"llm-ray canary: {msg}", file=sys.stderr, flush=True)


# -- canaries and the planted corpus ---------------------------------------------------------------

@dataclass(frozen=True)
class Canary:
    secret: str  # ``digits`` decimal digits
    text: str  # the template with the secret in place: one document of the planted corpus
    repeats: int  # times inserted; 0 = a control, never inserted


def make_canaries(cfg: CanaryConfig) -> list[Canary]:
    """``per_repeat`` canaries per count in ``repeats``, then ``controls``: distinct secrets
    drawn from (seed); a pure function of the config."""
    counts = [r for r in cfg.repeats for _ in range(cfg.per_repeat)] + [0] * cfg.controls
    draws = np.random.default_rng([cfg.seed, 0]).choice(cfg.space, size=len(counts), replace=False)
    secrets = [f"{int(i):0{cfg.digits}d}" for i in draws]
    return [Canary(s, cfg.template.replace(SECRET, s), r) for s, r in zip(secrets, counts)]


def check_scrubber_catches(canaries: Sequence[Canary], pii: PIIConfig | None = None) -> None:
    """RecipeError naming ``canaries.template`` unless the PII scrubber replaces every canary's
    secret: the scrubbed arm would otherwise train on it."""
    from llm_ray.data.pii import scrub_pii

    for c in canaries:
        scrubbed, counts = scrub_pii(c.text, pii or PIIConfig())
        if c.secret in scrubbed or not any(counts.values()):
            raise RecipeError("canaries.template", f"the PII scrubber does not catch {c.text!r} (it leaves {scrubbed!r}); "
                                                   "use a format llm_ray/data/pii.py detects, e.g. '020 7946 {secret}'")


def plant(documents: Sequence[str], canaries: Sequence[Canary], seed: int) -> list[str]:
    """``documents`` with each canary's text inserted ``repeats`` times as a document of its own,
    at boundaries drawn from (seed) and in a shuffled order (a canary's copies spread out)."""
    rng = np.random.default_rng([seed, 1])
    copies = [c.text for c in canaries for _ in range(c.repeats)]
    copies = [copies[i] for i in rng.permutation(len(copies))]
    slots = np.sort(rng.integers(0, len(documents) + 1, size=len(copies)))  # insert before documents[slot]
    out, j = [], 0
    for i, doc in enumerate(documents):
        while j < len(slots) and slots[j] == i:
            out.append(copies[j])
            j += 1
        out.append(doc)
    return out + copies[j:]


def write_documents(path: str, documents: Sequence[str]) -> str:
    """Documents joined by blank lines: ``read_documents`` splits the file back into the same list."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join(documents) + "\n")
    return path


def scrub_documents(documents: Sequence[str], pii: PIIConfig | None = None) -> tuple[list[str], dict[str, int]]:
    """The corpus pipeline's PII scrubber over every document; the replacement counts."""
    from llm_ray.data.pii import scrub_pii

    out, totals = [], {}
    for doc in documents:
        text, counts = scrub_pii(doc, pii or PIIConfig())
        out.append(text)
        for k, n in counts.items():
            totals[k] = totals.get(k, 0) + n
    return out, totals


# -- exposure --------------------------------------------------------------------------------------

def exposure_of_rank(rank, space: int):
    """log2 |R| - log2 rank (bits): 0 for the worst rank, log2 |R| for the best."""
    return math.log2(space) - np.log2(rank)


def random_baseline(space: int) -> float:
    """Expected exposure of a canary whose rank is uniform on 1..N: log2 N - log2(N!)/N (≈ 1.44)."""
    return math.log2(space) - math.lgamma(space + 1) / math.log(2) / space


def exact_ranks(targets: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """1-based rank of each target NLL among ``candidates`` (all of R, the targets included):
    1 + the candidates with a lower NLL; equal NLLs share their mid rank."""
    s = np.sort(candidates)
    below = np.searchsorted(s, targets, side="left")
    ties = np.searchsorted(s, targets, side="right") - below  # the target itself among them
    return below + (ties + 1) / 2


def skewnorm_exposure(targets: np.ndarray, sampled: np.ndarray, space: int) -> np.ndarray:
    """Carlini et al.'s estimate: rank ≈ |R| · CDF(NLL) of a skew-normal fitted (maximum
    likelihood, scipy) to the NLLs of random candidates, so exposure ≈ -log2 CDF(NLL); capped
    at log2 |R| (no rank is better than 1). scipy comes with the privacy extra (Opacus)."""
    from scipy import stats

    a, loc, scale = stats.skewnorm.fit(sampled)
    bits = -stats.skewnorm.logcdf(targets, a, loc, scale) / math.log(2)
    return np.clip(bits, 0.0, math.log2(space))


def measure_exposure(scorer: Scorer, canaries: Sequence[Canary], cfg: ExposureConfig, digits: int, seed: int) -> dict:
    """Each canary's NLL, rank and exposure under ``scorer``: exact when |R| <= cfg.exact_max
    (one pass over every candidate; plus ``estimate``, the skew-normal estimate from cfg.samples
    of those scores), else the skew-normal estimate from cfg.samples random candidates."""
    space = 10 ** digits
    draws = np.random.default_rng([seed, 2]).integers(0, space, size=cfg.samples)
    if space <= cfg.exact_max:
        every = scorer([f"{i:0{digits}d}" for i in range(space)])  # (|R|,)
        nll = every[[int(c.secret) for c in canaries]]
        rank = exact_ranks(nll, every)
        # The estimate from a sample of the same scores costs nothing here and shows how far the
        # distribution fit is from the truth on this model.
        estimate = skewnorm_exposure(nll, every[draws], space)
        return {"method": "exact", "nll": nll, "rank": rank, "exposure": exposure_of_rank(rank, space), "estimate": estimate}
    sampled = scorer([f"{int(i):0{digits}d}" for i in draws])
    nll = scorer([c.secret for c in canaries])
    bits = skewnorm_exposure(nll, sampled, space)
    return {"method": "skewnorm", "nll": nll, "rank": space * np.exp2(-bits), "exposure": bits}


class SecretScorer:
    """NLL (nats) of a secret's tokens after the template's prefix under a decoder LM, as a
    training document starts: after the separator token that ends the previous document.

    The whitespace before the secret is scored with it (a byte-level BPE joins " 1" into one
    token), so every candidate shares the same context tokens (checked per batch). The context
    runs once into a KV cache; a batch forwards only its candidates' tokens on top of it."""

    def __init__(self, model, tokenizer, template: str, sep_id: int, batch_size: int = 1024):
        self.model, self.tokenizer, self.sep_id, self.batch_size = model, tokenizer, sep_id, batch_size
        self.prefix = template[: -len(SECRET)]
        self.stem = len(self.prefix.rstrip())  # characters of context
        self._context = None  # (context ids, KVCache of [sep] + context, logits (1, 1, V) after it)

    def __call__(self, secrets: Sequence[str]) -> np.ndarray:
        return np.concatenate([self._batch(secrets[i : i + self.batch_size]) for i in range(0, len(secrets), self.batch_size)])

    def _split(self, secrets: Sequence[str]) -> tuple[list[int], list[list[int]]]:
        """(context ids, each secret's ids) of prefix + secret, cut where the secret's tokens begin."""
        encs = self.tokenizer.encode_batch([self.prefix + s for s in secrets], add_special_tokens=False)
        context, tails = None, []
        for secret, e in zip(secrets, encs):
            n = sum(1 for _, end in e.offsets if end <= self.stem)
            if context is None:
                context = e.ids[:n]
            elif e.ids[:n] != context:
                raise ValueError(f"the template's prefix tokenizes differently before {secret!r}: ranks would not compare")
            tails.append(e.ids[n:])
        return context, tails

    def _cached_context(self, context: list[int], rows: int):
        """A KV cache holding [sep] + context for ``rows`` rows, and the logits that predict the
        secret's first token, (rows, 1, V)."""
        import torch

        from llm_ray.models.kv_cache import KVCache

        if self._context is None or self._context[0] != context:
            cache = KVCache(self.model.cfg.n_layers)
            ids = torch.tensor([[self.sep_id, *context]], device=next(self.model.parameters()).device)  # (1, c)
            self._context = (context, cache, self.model(ids, kv_cache=cache, logits_to_keep=1))
        _, base, first = self._context
        cache = KVCache(base.n_layers)
        for i in range(base.n_layers):  # views: the batch's forward concatenates its own k/v after them
            cache.keys[i], cache.values[i] = (t.expand(rows, -1, -1, -1) for t in (base.keys[i], base.values[i]))
        return cache, first.expand(rows, -1, -1)

    def _batch(self, secrets: Sequence[str]) -> np.ndarray:
        import torch

        from llm_ray.models.losses import IGNORE_INDEX, sequence_logprobs

        with torch.inference_mode():
            context, tails = self._split(secrets)
            B, t = len(tails), max(len(x) for x in tails)
            ids = torch.full((B, t), self.sep_id, dtype=torch.long)  # right padding: causal rows never see it
            labels = torch.full((B, t), IGNORE_INDEX, dtype=torch.long)
            for row, tail in enumerate(tails):
                ids[row, : len(tail)] = labels[row, : len(tail)] = torch.tensor(tail)
            cache, first = self._cached_context(context, B)
            device = first.device
            logits = first  # (B, 1, V): predicts each secret's first token
            if t > 1:  # position j of the secret predicts its token j + 1
                logits = torch.cat([first, self.model(ids[:, :-1].to(device), kv_cache=cache)], dim=1)  # (B, t, V)
            return (-sequence_logprobs(logits, labels.to(device))).cpu().numpy()  # (B,)


# -- the stage -------------------------------------------------------------------------------------

def arm_recipe(spec: CanarySpec, arm: str, corpus: str, tokenizer: str, runs: str) -> Recipe:
    """The spec's training recipe for ``arm``: the planted (or scrubbed) corpus, the shared
    tokenizer, privacy.dp on for the DP arms; a refusal names the recipe key and the arm."""
    sets = [*spec.train_set, "data.source=text", f"data.paths={json.dumps([corpus])}", f"data.tokenizer.path={tokenizer}",
            "data.tokenizer.train_if_missing=false", f"run.storage_path={runs}", f"run.name={arm}", "checkpoint.resume=false"]
    if arm.startswith("dp"):
        d = spec.dp
        sets += ["privacy.dp.enabled=true", f"privacy.dp.noise_multiplier={d.noise_multiplier}", "privacy.dp.target_epsilon=null",
                 f"privacy.dp.max_grad_norm={d.max_grad_norm}", f"privacy.dp.delta={d.delta}"]
    else:
        sets.append("privacy.dp.enabled=false")
    try:
        return load_recipe(spec.train_recipe, sets)
    except RecipeError as e:
        raise RecipeError(e.key, f"{e.message} (arm {arm} of {spec.train_recipe})") from None


def _base_recipe(spec: CanarySpec) -> Recipe:
    recipe = load_recipe(spec.train_recipe, spec.train_set)
    if recipe.train.objective != "causal_lm":
        raise RecipeError("train.objective", f"canary exposure scores a decoder's next tokens: causal_lm, not {recipe.train.objective}")
    if recipe.data.source != "text":
        raise RecipeError("data.source", "canaries are planted into local text files: data.source text, not shards")
    return recipe


def _prepare(spec: CanarySpec, out: str) -> tuple[dict[str, str], str, list[Canary], dict]:
    """Everything before Ray: checks, the shared tokenizer, the canaries, the corpora on disk.
    Returns ({arm: corpus path}, tokenizer path, canaries, corpus figures)."""
    from llm_ray.data.text_files import list_text_files, read_documents
    from llm_ray.data.tokenizer import ensure_tokenizer, save_tokenizer

    base = _base_recipe(spec)
    runs = os.path.join(out, "runs")
    if os.path.isdir(runs) and os.listdir(runs):
        raise RecipeError("--out", f"{out} already holds the runs of a canary stage; choose a new one")
    tok_path = os.path.join(out, "tokenizer.json")
    for arm in spec.arms:  # every arm's refusals (DP's grad_clip, dropout, ZeRO-3) before anything runs
        arm_recipe(spec, arm, os.path.join(out, "corpus", "planted.txt"), tok_path, runs)
    canaries = make_canaries(spec.canaries)
    check_scrubber_catches(canaries)
    documents = read_documents(list_text_files(base.data.paths))
    documents = documents[: spec.max_documents] if spec.max_documents else documents
    leaked = [c.text for c in canaries if any(c.text in d for d in documents)]
    if leaked:  # a control already in the corpus would not be a never-seen baseline
        raise RecipeError("canaries.seed", f"{leaked[0]!r} is already in the corpus; choose another seed")
    # One tokenizer for every arm, from the corpus before planting: its merges know no canary.
    save_tokenizer(ensure_tokenizer(base.data.tokenizer, base.data.paths), tok_path)
    planted = plant(documents, canaries, spec.canaries.seed)
    corpora = {"plain": write_documents(os.path.join(out, "corpus", "planted.txt"), planted)}
    figures = {"documents": len(documents), "inserted": len(planted) - len(documents), "planted": corpora["plain"]}
    if any(a.endswith("scrubbed") for a in spec.arms):
        scrubbed, counts = scrub_documents(planted)
        if any(c.text in d for c in canaries for d in scrubbed):  # caught alone, yet not among its neighbours
            raise RuntimeError("a canary survived the PII scrubber in the planted corpus")
        corpora["scrubbed"] = write_documents(os.path.join(out, "corpus", "scrubbed.txt"), scrubbed)
        figures.update(scrubbed=corpora["scrubbed"], scrubbed_counts=counts)
    return {a: corpora["scrubbed" if a.endswith("scrubbed") else "plain"] for a in spec.arms}, tok_path, canaries, figures


def _summarise(canaries: Sequence[Canary], measured: dict) -> dict:
    """Mean and max exposure per repetition count and of the controls; every canary's figures."""
    bits = measured["exposure"]
    groups = {}
    for r in sorted({c.repeats for c in canaries if c.repeats}):
        vals = [float(b) for c, b in zip(canaries, bits) if c.repeats == r]
        groups[str(r)] = {"mean": float(np.mean(vals)), "max": float(np.max(vals))}
    controls = [float(b) for c, b in zip(canaries, bits) if c.repeats == 0]
    rows = [{"secret": c.secret, "repeats": c.repeats, "nll": float(n), "rank": float(k), "exposure": float(b)}
            for c, n, k, b in zip(canaries, measured["nll"], measured["rank"], bits)]
    out = {"exposure": groups, "controls": {"mean": float(np.mean(controls)), "max": float(np.max(controls))}, "canaries": rows}
    if "estimate" in measured:  # exact ranks: how far the skew-normal estimate is from them
        out["skewnorm_max_abs_error_bits"] = float(np.max(np.abs(measured["estimate"] - bits)))
    return out


def _train_and_measure(spec: CanarySpec, arm: str, corpus: str, tok_path: str, out: str, canaries: list[Canary]) -> dict:
    from llm_ray.bundle import load_bundle
    from llm_ray.data.tokenizer import special_ids
    from llm_ray.train.export import export_model
    from llm_ray.train.launcher import pretrain

    started = time.time()
    recipe = arm_recipe(spec, arm, corpus, tok_path, os.path.join(out, "runs"))
    _log(f"arm {arm}: training {recipe.train.max_steps} steps on {corpus}")
    run = pretrain(recipe)
    trained = time.time()
    folder = export_model(run.out_dir, os.path.join(out, "models", arm)).out_dir
    bundle = load_bundle(folder)
    sep = special_ids(bundle.tokenizer).eos_id
    scorer = SecretScorer(bundle.model.eval(), bundle.tokenizer, spec.canaries.template, sep, spec.exposure.batch_size)
    measured = measure_exposure(scorer, canaries, spec.exposure, spec.canaries.digits, spec.canaries.seed)
    s = run.summary
    result = {"run_dir": run.out_dir, "model": folder, "initial_loss": s.get("initial_loss"), "final_loss": s.get("final_loss"),
              "steps": s.get("steps"), "method": measured["method"], **_summarise(canaries, measured),
              "train_s": round(trained - started, 1), "score_s": round(time.time() - trained, 1)}
    if "privacy" in s:
        result["epsilon"], result["delta"] = s["privacy"]["epsilon"], s["privacy"]["delta"]
        result["noise_multiplier"] = s["privacy"]["noise_multiplier"]
    _log(f"arm {arm}: " + ", ".join(f"{r}x {g['mean']:.2f} bits" for r, g in result["exposure"].items())
         + f", controls {result['controls']['mean']:.2f} bits, final loss {result['final_loss']:.3f}")
    return result


def canary_stage(spec: CanarySpec, out_dir: str) -> StageResult:
    """Plant, train every arm, measure; ``summary.json`` and ``report.md`` in ``out_dir``."""
    out = os.path.abspath(out_dir)
    started = time.time()
    corpora, tok_path, canaries, corpus = _prepare(spec, out)
    _log(f"{corpus['inserted']} canary copies planted among {corpus['documents']} documents")
    arms = {arm: _train_and_measure(spec, arm, corpora[arm], tok_path, out, canaries) for arm in spec.arms}
    space = spec.canaries.space
    summary = {
        "out_dir": out,
        "template": spec.canaries.template,
        "space": space,
        "max_exposure_bits": math.log2(space),
        "random_baseline_bits": random_baseline(space),
        "method": "exact" if space <= spec.exposure.exact_max else "skewnorm",
        "repeats": spec.canaries.repeats,
        "per_repeat": spec.canaries.per_repeat,
        "controls": spec.canaries.controls,
        "corpus": corpus,
        "arms": arms,
        "wall_s": round(time.time() - started, 1),
    }
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report_markdown(summary))
    return write_summary(out, summary)


def report_markdown(summary: dict) -> str:
    reps = [str(r) for r in summary["repeats"]]
    lines = [f"# Canary exposure: `{summary['template']}`", "",
             f"|R| = {summary['space']:,} ({summary['method']} ranks), at most {summary['max_exposure_bits']:.2f} bits; "
             f"a random rank averages {summary['random_baseline_bits']:.2f} bits. {summary['per_repeat']} canaries per "
             f"repetition count, {summary['controls']} never-inserted controls; {summary['corpus']['inserted']} copies among "
             f"{summary['corpus']['documents']} documents. Mean (max) exposure in bits.", "",
             "| arm | final loss | ε | " + " | ".join(f"{r}x" for r in reps) + " | controls |",
             "|---|---|---|" + "---|" * len(reps) + "---|"]
    for arm, a in summary["arms"].items():
        eps = f"{a['epsilon']:.2f}" if "epsilon" in a else "-"
        cells = [f"{a['exposure'][r]['mean']:.2f} ({a['exposure'][r]['max']:.2f})" for r in reps]
        ctrl = f"{a['controls']['mean']:.2f} ({a['controls']['max']:.2f})"
        lines.append(f"| {arm} | {a['final_loss']:.3f} | {eps} | " + " | ".join(cells) + f" | {ctrl} |")
    errors = {arm: a["skewnorm_max_abs_error_bits"] for arm, a in summary["arms"].items() if "skewnorm_max_abs_error_bits" in a}
    if errors:  # exact ranks: how good Carlini's distribution fit would have been on these models
        lines += ["", "Skew-normal estimate from a sample of the same scores against the exact exposure, largest error: "
                  + ", ".join(f"{arm} {e:.2f} bits" for arm, e in errors.items()) + "."]
    return "\n".join(lines) + f"\n\n{summary['wall_s']:.0f} s in all.\n"
