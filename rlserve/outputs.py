"""What a finished (or streaming) request gives back, shaped like vLLM's ``RequestOutput``."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely; None when not computed
    decoded_token: str | None = None


@dataclass(frozen=True)
class TopLogprobs:
    """The top N of each generated token of a sample, by rank: two [T, N] arrays, not T lists of N tuples -- an RL
    batch with logprobs=5 is 1.3M (id, logprob) entries, which as Python objects cost the API process more than
    the generation itself. Made from the sampler's [S, N] tensors, shipped to the API as these two arrays, read
    by the routes as arrays."""
    ids: np.ndarray  # [T, N] int32
    logprobs: np.ndarray  # [T, N] fp32

    def __len__(self) -> int:
        return len(self.ids)

    def __eq__(self, other) -> bool:  # the values, bit for bit (a dataclass's == would compare arrays' truth)
        return (isinstance(other, TopLogprobs) and np.array_equal(self.ids, other.ids)
                and self.logprobs.dtype == other.logprobs.dtype and self.logprobs.shape == other.logprobs.shape
                and self.logprobs.tobytes() == other.logprobs.tobytes())

    __hash__ = None

    @property
    def num_top(self) -> int:
        return self.ids.shape[1]

    def pairs(self) -> list[list[tuple[int, float]]]:
        """Per token, [(id, logprob), ...] by rank (Python ints and floats, the fp32 values widened)."""
        return [list(zip(ids, values)) for ids, values in zip(self.ids.tolist(), self.logprobs.tolist())]

    @classmethod
    def empty(cls, num_top: int) -> "TopLogprobs":
        return cls(np.zeros((0, num_top), np.int32), np.zeros((0, num_top), np.float32))

    @classmethod
    def concat(cls, chunks: list["TopLogprobs"], num_top: int) -> "TopLogprobs":
        """A sample's rows from the updates that carried them (one chunk, the usual case: itself, no copy).
        Empty chunks are left out: their width is the one asked for, which a small vocabulary can cut."""
        chunks = [c for c in chunks if len(c)]
        if len(chunks) <= 1:
            return chunks[0] if chunks else cls.empty(num_top)
        return cls(np.concatenate([c.ids for c in chunks]), np.concatenate([c.logprobs for c in chunks]))


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    # Per generated token: the sampled token's logprob, and (when logprobs=N > 0) the top N by rank as arrays
    # (``top_logprobs`` gives them as (id, logprob) tuples). Logprobs are those of the distribution actually
    # sampled from unless logprobs_mode="raw".
    sampled_logprobs: list[float] | None = None
    top_n: TopLogprobs | None = None
    weight_versions: list[int] = field(default_factory=list)  # distinct weight versions its tokens saw
    error: str | None = None
    _top_pairs: tuple | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cumulative_logprob(self) -> float | None:
        return None if self.sampled_logprobs is None else float(sum(self.sampled_logprobs))

    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]] | None:
        """Per generated token, the top N as (id, logprob) sorted by rank (logprobs=N > 0; else None). Built
        from ``top_n`` at the first read and kept while ``top_n`` stays the same object."""
        if self.top_n is None:
            return None
        if self._top_pairs is None or self._top_pairs[0] is not self.top_n:
            self._top_pairs = (self.top_n, self.top_n.pairs())
        return self._top_pairs[1]

    @property
    def logprobs(self) -> list[dict[int, Logprob]] | None:
        """vLLM's layout: per token, {token_id: Logprob}, the sampled token first, then the top N."""
        if self.sampled_logprobs is None:
            return None
        result, tops = [], self.top_logprobs
        for i, (token, lp) in enumerate(zip(self.token_ids, self.sampled_logprobs)):
            entry = {token: Logprob(lp)}
            for rank, (tid, tlp) in enumerate(tops[i] if tops else [], start=1):
                if tid == token:
                    entry[token] = Logprob(lp, rank)
                else:
                    entry[tid] = Logprob(tlp, rank)
            result.append(entry)
        return result

    def trl_logprobs(self) -> tuple[list[list[float]], list[list[int]]] | tuple[None, None]:
        """TRL's layout: per token, the sampled token alone (logprobs=0), or up to N+1 tokens sorted by
        descending logprob with the sampled one always included (logprobs=N). The definition, token by token;
        the routes build the same from the arrays (rlserve/server/trl_logprobs.py)."""
        if self.sampled_logprobs is None:
            return None, None
        values, ids, tops = [], [], self.top_logprobs
        for i, (token, lp) in enumerate(zip(self.token_ids, self.sampled_logprobs)):
            top = tops[i] if tops else []
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


@dataclass(frozen=True)
class PromptLogprobs:
    """A prompt's logprobs (``SamplingParams.prompt_logprobs=K``): for each position p >= 1 of a prompt of P
    tokens, the distribution predicting token p from tokens < p, log_softmax(logits / temperature) in fp32.
    Row p - 1 of every array is position p. Arrays, not dicts: a teacher-scoring batch is thousands of positions
    x 100 tokens. Indexing it gives vLLM's layout: ``pl[0] is None``, ``pl[p] == {token_id: Logprob}``.

    ``ranks`` follows vLLM: the number of tokens at least as likely as the prompt token (1 + the number strictly
    more likely when nothing ties with it), so that when it is not among the top K its rank is > K."""
    token_ids: np.ndarray  # [P-1] int64: prompt tokens 1..P-1
    logprobs: np.ndarray  # [P-1] fp32: their logprobs
    ranks: np.ndarray  # [P-1] int32: their ranks, 1-based
    top_ids: np.ndarray  # [P-1, K] int32: the K most likely tokens, by rank
    top_logprobs: np.ndarray  # [P-1, K] fp32: their logprobs

    @property
    def num_top(self) -> int:
        return self.top_ids.shape[1]

    def __len__(self) -> int:
        return len(self.token_ids) + 1

    def __getitem__(self, p: int) -> dict[int, Logprob] | None:
        """vLLM's entry for position p: the prompt token's Logprob first, then the top K (a prompt token among
        them keeps its top-K rank)."""
        if p < 0:
            p += len(self)
        if not 0 <= p < len(self):
            raise IndexError(f"position {p} is outside the prompt (0..{len(self) - 1})")
        if p == 0:
            return None
        row = p - 1
        entry = {int(self.token_ids[row]): Logprob(float(self.logprobs[row]), int(self.ranks[row]))}
        for rank, (tid, lp) in enumerate(zip(self.top_ids[row].tolist(), self.top_logprobs[row].tolist()), start=1):
            entry[tid] = Logprob(lp, rank)
        return entry

    def __iter__(self):
        return (self[p] for p in range(len(self)))

    @classmethod
    def concat(cls, chunks: list["PromptLogprobs"], num_top: int) -> "PromptLogprobs":
        """One prompt's rows from the chunks its prefill was computed in (a copy: chunks are views of a step's
        arrays)."""
        if not chunks:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.int32),
                       np.zeros((0, num_top), np.int32), np.zeros((0, num_top), np.float32))
        return cls(*(np.concatenate([getattr(c, name) for c in chunks]) for name in
                     ("token_ids", "logprobs", "ranks", "top_ids", "top_logprobs")))


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    prompt_logprobs: PromptLogprobs | None = None  # when SamplingParams.prompt_logprobs was set

    @property
    def weight_versions(self) -> list[int]:
        seen: list[int] = []
        for out in self.outputs:
            for v in out.weight_versions:
                if v not in seen:
                    seen.append(v)
        return sorted(seen)
