"""What a finished (or streaming) request gives back, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when not computed
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: the sampled token's logprob, and (when logprobs=N > 0) the top N as (id, logprob)
    # sorted by rank. Logprobs are those of the distribution actually sampled from unless logprobs_mode="raw".
    sampled_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    weight_versions: list[int] = field(default_factory=list)  # distinct weight versions its tokens saw
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.sampled_logprobs is None else float(sum(self.sampled_logprobs))

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        """vLLM's layout: per token, {token_id: Logprob}, the sampled token first, then the top N."""
        if self.sampled_logprobs is None:
            return None
        result = []
        for i, (token, lp) in enumerate(zip(self.token_ids, self.sampled_logprobs)):
            entry = {token: Logprob(lp)}
            for rank, (tid, tlp) in enumerate(self.top_logprobs[i] if self.top_logprobs else [], start=1):
                if tid == token:
                    entry[token] = Logprob(lp, rank)
                else:
                    entry[tid] = Logprob(tlp, rank)
            result.append(entry)
        return result

    def trl_logprobs(self) -> tuple[list[list[float]], list[list[int]]] | tuple[None, None]:
        """TRL's layout: per token, the sampled token alone (logprobs=0), or up to N+1 tokens sorted by
        descending logprob with the sampled one always included (logprobs=N)."""
        if self.sampled_logprobs is None:
            return None, None
        values, ids = [], []
        for i, (token, lp) in enumerate(zip(self.token_ids, self.sampled_logprobs)):
            top = self.top_logprobs[i] if self.top_logprobs else []
            if not top:
                values.append([lp])
                ids.append([token])
                continue
            merged = dict(top)
            merged[token] = lp
            ranked = sorted(merged.items(), key=lambda item: -item[1])
            ids.append([t for t, _ in ranked])
            values.append([v for _, v in ranked])
        return values, ids


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0

    @property
    def weight_versions(self) -> list[int]:
        seen: list[int] = []
        for out in self.outputs:
            for v in out.weight_versions:
                if v not in seen:
                    seen.append(v)
        return sorted(seen)
