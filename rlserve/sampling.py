"""Sampling parameters of a request, validated on construction.

Field names and meanings follow vLLM's ``SamplingParams``: a TRL or vLLM user finds the same knobs here.
Every invalid value raises ``ValueError`` naming the field and the limit; the server turns it into a 400.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

MAX_N = 1024
# Prompt logprobs serve teacher scoring (TRL's distillation asks for the top 100 per position). The bound keeps a
# request's host-side result (positions x K x 8 bytes) sane; the engine also caps it at the vocabulary size.
MAX_PROMPT_LOGPROBS = 1000


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: none; 0: the sampled token's; N: plus the top N
    logprobs_mode: str = "processed"  # "processed": the distribution sampled from; "raw": log_softmax(logits)
    # None: none; K: for every prompt position p >= 1, the logprob and rank of prompt token p and the top K tokens
    # of the distribution predicting it, log_softmax(logits / temperature) in fp32 (temperature 0: unscaled). Only
    # temperature applies (no penalties, no top-k/top-p). With max_tokens=0 the request only scores its prompt.
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: dict | None = None  # {"regex": ...} | {"json": schema} | {"choice": [...]}
    extra_args: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.stop is not None and not isinstance(self.stop, (str, list, tuple)):
            raise ValueError(f"stop must be a string or a list of strings, got {type(self.stop).__name__}")
        if self.stop_token_ids is not None and not isinstance(self.stop_token_ids, (list, tuple)):
            raise ValueError(f"stop_token_ids must be a list of integers, got {type(self.stop_token_ids).__name__}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        _check_int("n", self.n, 1, MAX_N)
        _check_float("temperature", self.temperature, 0.0, None)
        _check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        _check_int("top_k", self.top_k, 0, None, hint=" (0 or -1 disables it)")
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, None, low_open=True)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        if self.seed is not None:
            _check_int("seed", self.seed, -(2**63), 2**63 - 1)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_PROMPT_LOGPROBS)
        if self.max_tokens is not None:
            scoring = self.prompt_logprobs is not None  # max_tokens=0: score the prompt, generate nothing
            _check_int("max_tokens", self.max_tokens, 0 if scoring else 1, None,
                       hint="" if scoring else " (0 only with prompt_logprobs)")
        _check_int("min_tokens", self.min_tokens, 0, self.max_tokens)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, None)  # the cap is the server's (--max_logprobs)
        for name in ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if not isinstance(self.extra_args, dict):
            raise ValueError(f"extra_args must be an object, got {type(self.extra_args).__name__}")
        if self.logprobs_mode not in ("processed", "raw"):
            raise ValueError(f"logprobs_mode must be 'processed' or 'raw', got {self.logprobs_mode!r}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop must hold non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, 0, None)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, dict):
            raise ValueError("structured_outputs must be a dict with one of 'regex', 'json', 'choice'")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def scores_only(self) -> bool:
        """Compute the prompt (and its prompt logprobs) without generating a token."""
        return self.max_tokens == 0

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def truncates(self) -> bool:
        """Whether top-k, top-p or min-p cut the distribution."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        """Build from a request dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        return cls(**values)

    def clone(self, **changes) -> "SamplingParams":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return SamplingParams(**values)


def _check_int(name: str, value, low, high, hint: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}{hint}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}{hint}, got {value}")


FLOAT32_MAX = 3.4028234663852886e38  # the sampler computes in fp32: larger values would become inf there


def _check_float(name: str, value, low, high, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if abs(value) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite 32-bit float (at most {FLOAT32_MAX:.4g} in size), got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
