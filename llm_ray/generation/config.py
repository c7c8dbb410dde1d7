"""Generation settings: ``SamplingParams`` (per request / per row) and ``GenerationConfig``.

Plain dataclasses validated in ``__post_init__``; a bad value raises ``ValueError`` whose
message starts with the field name (``top_p: must be in (0, 1], got 0``). No torch import here,
so the CLI and the serving layer can validate requests before loading a model.

Greedy vs sampling follows Hugging Face: ``do_sample=False`` is greedy whatever the temperature;
with ``do_sample=True`` a temperature of 0 also means greedy (the OpenAI-API convention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union


MAX_TOP_K = 2**31 - 1  # larger values mean "the whole vocabulary" anyway
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 100.0  # beyond, fp32 logits overflow to inf
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit


def _check(cond: bool, name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{name}: {msg}")


@dataclass
class SamplingParams:
    """How one sequence picks its next token and when it stops.

    temperature          logits / T before sampling (>= 0; 0 = greedy)
    top_k                keep the k most likely tokens (0 = off)
    top_p                keep the smallest set whose probability reaches p (1 = off)
    repetition_penalty   CTRL-style penalty on tokens already in the prompt or output (1 = off)
    presence_penalty     OpenAI: subtracted once from every token already generated (0 = off)
    frequency_penalty    OpenAI: subtracted per occurrence in the generated tokens (0 = off)
    logit_bias           OpenAI: {token id: bias in [-100, 100]} added to the raw logits
    seed                 seeds this sequence's own torch.Generator (reproducible sampling)
    stop                 strings that end the generation; the output is cut before them
    stop_token_ids       extra token ids that end it (the model's eos ids are always added)
    logprobs             None = no log-probs; k >= 0 = the chosen token's log-prob plus the k
                         most likely alternatives at each step

    The bounds are what the token step can honour without overflow (a top_k past the
    vocabulary is the whole vocabulary; a seed is taken modulo 2**64 by ``make_generators``).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: Optional[int] = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    logprobs: Optional[int] = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]
        _check(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1, "max_new_tokens", f"must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(isinstance(self.do_sample, bool), "do_sample", f"must be true or false, got {self.do_sample!r}")
        _check(_is_number(self.temperature) and self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature!r}")
        _check(isinstance(self.top_k, int) and 0 <= self.top_k <= MAX_TOP_K, "top_k", f"must be an integer in [0, {MAX_TOP_K}] (0 = off), got {self.top_k!r}")
        _check(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        _check(
            _is_number(self.repetition_penalty) and MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            "repetition_penalty",
            f"must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY}] (1 = off), got {self.repetition_penalty!r}",
        )
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            _check(_is_number(v) and -2.0 <= v <= 2.0, name, f"must be in [-2, 2] (0 = off), got {v!r}")
        try:
            self.logit_bias = {int(k): float(v) for k, v in dict(self.logit_bias or {}).items()}
        except (TypeError, ValueError):
            raise ValueError(f"logit_bias: must map token ids to numbers, got {self.logit_bias!r}") from None
        _check(all(-100.0 <= v <= 100.0 for v in self.logit_bias.values()), "logit_bias", "biases must be in [-100, 100]")
        _check(all(k >= 0 for k in self.logit_bias), "logit_bias", "token ids must be >= 0")
        _check(self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)), "seed", f"must be an integer or null, got {self.seed!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= MAX_LOGPROBS), "logprobs", f"must be null or an integer in [0, {MAX_LOGPROBS}], got {self.logprobs!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", f"must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        """Argmax decoding: no sampling asked for, or a temperature of 0."""
        return not self.do_sample or self.temperature == 0

    def replace(self, **changes) -> "SamplingParams":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class GenerationConfig(SamplingParams):
    """``SamplingParams`` plus beam search (the batch-level settings of ``generate``).

    num_beams        1 = greedy/sampling; > 1 = beam search (deterministic, no sampling)
    length_penalty   a finished beam scores sum(logprobs) / length ** length_penalty (HF)
    early_stopping   True: stop a prompt once num_beams hypotheses are done; False: stop when
                     no running beam can still beat them (HF heuristic); "never": exact check
    num_return_sequences  best hypotheses returned per prompt (<= num_beams)
    """

    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    num_return_sequences: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(isinstance(self.num_beams, int) and self.num_beams >= 1, "num_beams", f"must be an integer >= 1, got {self.num_beams!r}")
        _check(_is_number(self.length_penalty), "length_penalty", f"must be a number, got {self.length_penalty!r}")
        _check(self.early_stopping in (True, False, "never"), "early_stopping", f"must be true, false or 'never', got {self.early_stopping!r}")
        _check(
            isinstance(self.num_return_sequences, int) and 1 <= self.num_return_sequences <= self.num_beams,
            "num_return_sequences",
            f"must be between 1 and num_beams ({self.num_beams}), got {self.num_return_sequences!r}",
        )
        _check(not (self.num_beams > 1 and self.do_sample), "do_sample", "beam search here is deterministic: use num_beams=1 to sample")

    def sampling_params(self) -> SamplingParams:
        """The per-row part (what the serving layer and the step function take)."""
        names = {f.name for f in dataclasses.fields(SamplingParams)}
        return SamplingParams(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
