"""From logits to tokens, in vLLM's order: allowed-token mask → min_tokens → penalties → temperature → min_p →
top-k/top-p → draw. Each stage runs only when some row of the batch uses it.

One draw rule per device, applied to every row whatever its neighbours need, so that a seeded row draws the
same tokens alone or in any batch. Randomness is counter-based: every row carries a 63-bit seed derived from
(sequence seed, output position) on the host, so nothing here needs a per-row generator or a host sync.

- CUDA (Triton): Gumbel-max, ``argmax(x * (1/T) + g)`` with Gumbel noise ``g`` from Philox keyed by the row's
  seed and the token index (``sampler_triton.gumbel_sample``). The kernel always receives the *unscaled*
  logits -- raw for rows that need nothing else, penalised and with -inf where a mask, min_tokens or the
  truncation (decided here on ``x / T``) cuts -- and scales them itself, so that a row's scores are computed
  by the same instructions on the same values on either path.
- CPU: inverse CDF over the processed distribution, one uniform per row from the seed's bits.

Returned logprobs are the log-softmax of exactly the processed logits (fp32), the quantity an
importance-sampling correction needs.

A guided row whose grammar allows only stop tokens while ``min_tokens`` bans them keeps its stop tokens: the
grammar wins (the sample ends with finish reason "stop"), never an all -inf row whose draw would be NaN.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per sample row (S rows; a forking parent contributes one row per sample). Tensors on the device."""
    logits_index: torch.Tensor  # [S] int64: the logits row each sample row reads
    temperature: torch.Tensor  # [S] fp32, 1.0 for greedy rows
    is_greedy: torch.Tensor  # [S] bool
    seeds: torch.Tensor  # [S] int64, non-negative
    all_greedy: bool
    any_greedy: bool = False
    needs_gather: bool = True  # False when logits rows map one-to-one onto sample rows (no fork this step)
    top_k: torch.Tensor | None = None  # [S] int64, vocab size where off
    top_p: torch.Tensor | None = None  # [S] fp32, 1.0 where off
    min_p: torch.Tensor | None = None  # [S] fp32, 0.0 where off
    # Penalties, on the P rows that use them (ascending): their parameters, and their rows of the persistent
    # penalty state (penalty_state.py): counts of each token in the output so far, tokens seen in prompt or output.
    penalty_rows: torch.Tensor | None = None  # [P] int64: sample rows
    penalty_slots: torch.Tensor | None = None  # [P] int64: their rows of output_counts and seen
    # Each None when no row uses it (1.0, +0.0, +0.0 on every row): a no-op on the logits, bit for bit.
    repetition_penalty: torch.Tensor | None = None  # [P] fp32
    presence_penalty: torch.Tensor | None = None  # [P] fp32
    frequency_penalty: torch.Tensor | None = None  # [P] fp32
    output_counts: torch.Tensor | None = None  # [slots, V] int16 or int32
    seen: torch.Tensor | None = None  # [slots, V] bool
    banned: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids) set to -inf (min_tokens)
    allowed_mask: torch.Tensor | None = None  # [S, V] bool (structured outputs); None = all allowed
    max_num_logprobs: int = -1  # -1: no row wants logprobs; 0: sampled only; N: plus the top N
    raw_logprob_rows: torch.Tensor | None = None  # [S] bool: rows that want raw (unprocessed) logprobs
    failed_items: dict[int, str] = field(default_factory=dict)  # item -> error: its rows are placeholders
    step_seeds: torch.Tensor | None = None  # [K, S]: a multi-step launch's seeds, step k's at output position + k


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [S] int64
    logprobs: torch.Tensor | None  # [S] fp32: the sampled token's
    top_ids: torch.Tensor | None  # [S, N] int64
    top_logprobs: torch.Tensor | None  # [S, N] fp32


def sample(logits: torch.Tensor, batch: SamplingBatch, gumbel_sample=None) -> SamplerOutput:
    """logits: [R, V] fp32, one row per sampling sequence; modified in place. ``gumbel_sample``: the CUDA draw
    kernel (``sampler_triton.gumbel_sample``); None draws by inverse CDF."""
    if batch.needs_gather:
        logits = logits.index_select(0, batch.logits_index)  # [S, V]; processed in place below
    raw_logprobs = None
    if batch.raw_logprob_rows is not None and batch.max_num_logprobs >= 0:
        raw_logprobs = torch.log_softmax(logits, dim=-1)
    if batch.allowed_mask is not None:
        logits.masked_fill_(~batch.allowed_mask, NEG_INF)
    if batch.banned is not None:
        _ban(logits, batch.banned, keep_if_nothing_else=batch.allowed_mask is not None)
    if batch.penalty_rows is not None:
        _apply_penalties(logits, batch)
    if gumbel_sample is not None:
        return _sample_gumbel(logits, batch, raw_logprobs, gumbel_sample)

    if batch.all_greedy:
        token_ids = logits.argmax(dim=-1)
    else:
        logits.div_(batch.temperature.unsqueeze(1))
        if batch.min_p is not None or batch.top_k is not None or batch.top_p is not None:
            logits = _truncate(logits, batch)
        token_ids = _draw(logits, _uniform(batch.seeds))
        if batch.any_greedy:
            token_ids = torch.where(batch.is_greedy, logits.argmax(dim=-1), token_ids)
    if batch.max_num_logprobs < 0:
        return SamplerOutput(token_ids, None, None, None)
    return _with_logprobs(token_ids, torch.log_softmax(logits, dim=-1), raw_logprobs, batch)


def _sample_gumbel(logits: torch.Tensor, batch: SamplingBatch, raw_logprobs, gumbel_sample) -> SamplerOutput:
    """The CUDA rule: truncation decided on ``x / T`` but applied as -inf on the unscaled ``x``, which the
    kernel scales and draws from (greedy rows: the argmax)."""
    inv_temperature = 1.0 / batch.temperature  # greedy rows have temperature 1: their logits as they are
    if batch.min_p is not None or batch.top_k is not None or batch.top_p is not None:
        scaled = _truncate(logits * inv_temperature.unsqueeze(1), batch)
        logits.masked_fill_(scaled == NEG_INF, NEG_INF)
    token_ids, sampled = gumbel_sample(logits, inv_temperature, batch.is_greedy, batch.seeds)
    if batch.max_num_logprobs < 0:
        return SamplerOutput(token_ids, None, None, None)
    if batch.max_num_logprobs == 0 and raw_logprobs is None:
        return SamplerOutput(token_ids, sampled, None, None)
    logprobs = torch.log_softmax(logits * inv_temperature.unsqueeze(1), dim=-1)
    return _with_logprobs(token_ids, logprobs, raw_logprobs, batch)


def _with_logprobs(token_ids: torch.Tensor, logprobs: torch.Tensor, raw_logprobs, batch: SamplingBatch
                   ) -> SamplerOutput:
    if raw_logprobs is not None:
        logprobs = torch.where(batch.raw_logprob_rows.unsqueeze(1), raw_logprobs, logprobs)
    sampled = logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
    top_ids = top_values = None
    if batch.max_num_logprobs > 0:
        top_values, top_ids = logprobs.topk(min(batch.max_num_logprobs, logprobs.shape[-1]), dim=-1)
    return SamplerOutput(token_ids, sampled, top_ids, top_values)


def _ban(logits: torch.Tensor, banned: tuple[torch.Tensor, torch.Tensor], keep_if_nothing_else: bool) -> None:
    """-inf on the (row, token) pairs of ``banned`` (stop tokens before min_tokens). With a grammar mask a
    row may allow nothing but those tokens: then they stay (the grammar wins over min_tokens)."""
    if not keep_if_nothing_else:
        logits[banned] = NEG_INF
        return
    before = logits[banned]
    logits[banned] = NEG_INF
    emptied = torch.isneginf(logits).all(dim=-1)  # [S]
    logits[banned] = torch.where(emptied[banned[0]], before, NEG_INF)


def _truncate(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """min_p, then top-k/top-p, on temperature-scaled logits [S, V]: -inf where a token is cut."""
    if batch.min_p is not None:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * batch.min_p.unsqueeze(1)
        logits.masked_fill_(probs < threshold, NEG_INF)
    if batch.top_k is not None or batch.top_p is not None:
        logits = _top_k_top_p(logits, batch.top_k, batch.top_p)
    return logits


def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> None:
    """vLLM's semantics: repetition over prompt and output tokens; presence/frequency over output tokens. Only
    the penalised rows are read and written (elementwise: a row's result does not depend on the others)."""
    rows = batch.penalty_rows
    every_row = rows.numel() == logits.shape[0]  # the rows are distinct and ascending: then 0..S-1
    x = logits if every_row else logits[rows]  # [P, V]
    slots = batch.penalty_slots
    if batch.repetition_penalty is not None:
        rep = batch.repetition_penalty.unsqueeze(1)
        penalized = torch.where(x > 0, x / rep, x * rep)
        x.copy_(torch.where(batch.seen[slots], penalized, x))
    if batch.frequency_penalty is not None or batch.presence_penalty is not None:
        counts = batch.output_counts[slots]  # [P, V] int: exact in fp32 below
        if batch.frequency_penalty is not None:
            x.sub_(batch.frequency_penalty.unsqueeze(1) * counts)
        if batch.presence_penalty is not None:
            x.sub_(batch.presence_penalty.unsqueeze(1) * (counts > 0).to(x.dtype))
    if not every_row:
        logits[rows] = x


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Keep the k largest logits (ties with the k-th kept), then the smallest set of tokens whose probability
    reaches p -- the same rule as Hugging Face's TopK/TopP warpers."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    vocab = logits.shape[-1]
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, NEG_INF)
    if top_p is not None:
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p).unsqueeze(1)
        drop[:, -1] = False  # always keep the most likely token
        sorted_logits.masked_fill_(drop, NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def is_simple(batch: SamplingBatch) -> bool:
    """Temperature (or greedy) only, at most the sampled token's processed logprob: the draw kernel alone,
    on the logits as the model returned them."""
    return (batch.top_k is None and batch.top_p is None and batch.min_p is None
            and batch.penalty_rows is None and batch.banned is None and batch.allowed_mask is None
            and batch.raw_logprob_rows is None and batch.max_num_logprobs <= 0)


def worst_case_batch(num_rows: int, num_logits_rows: int, vocab_size: int, max_logprobs: int,
                     device: torch.device, penalty_state: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> SamplingBatch:
    """A batch that runs every stage on every row (mask, min_tokens, penalties, min-p, top-k, top-p, raw and
    top-N logprobs): what the memory profile samples, so that the KV cache leaves room for the sampler's
    peak (top-p sorts [rows, vocab] with int64 indices). ``penalty_state``: the (counts, seen) buffers, at
    least ``num_rows`` slots, the rows read (None: int32 and bool zeros allocated here)."""
    if penalty_state is None:
        penalty_state = (torch.zeros(num_rows, vocab_size, dtype=torch.int32, device=device),
                         torch.zeros(num_rows, vocab_size, dtype=torch.bool, device=device))

    def full(value, dtype=torch.float32):
        return torch.full((num_rows,), value, dtype=dtype, device=device)

    rows = torch.arange(num_rows, device=device)
    return SamplingBatch(
        logits_index=rows % num_logits_rows, temperature=full(0.7), is_greedy=full(False, torch.bool),
        seeds=rows * 7919 + 1, all_greedy=False, any_greedy=False, needs_gather=True,
        top_k=full(max(vocab_size // 2, 1), torch.int64), top_p=full(0.9), min_p=full(0.01),
        penalty_rows=rows, penalty_slots=rows,
        repetition_penalty=full(1.1), presence_penalty=full(0.1), frequency_penalty=full(0.1),
        output_counts=penalty_state[0], seen=penalty_state[1],
        banned=(rows, torch.zeros(num_rows, dtype=torch.int64, device=device)),
        allowed_mask=torch.ones(num_rows, vocab_size, dtype=torch.bool, device=device),
        max_num_logprobs=max_logprobs, raw_logprob_rows=full(True, torch.bool))


def slice_rows(batch: SamplingBatch, start: int, stop: int) -> SamplingBatch:
    """Rows [start, stop) of a batch, to sample a large one in parts (a request forking into more samples
    than a step runs sequences); their logits_index still points into the step's logits."""
    def part(t):
        return None if t is None else t[start:stop]

    penalties = {}
    if batch.penalty_rows is not None:
        inside = (batch.penalty_rows >= start) & (batch.penalty_rows < stop)
        if bool(inside.any()):
            def pick(t):
                return None if t is None else t[inside]

            penalties = dict(
                penalty_rows=batch.penalty_rows[inside] - start, penalty_slots=batch.penalty_slots[inside],
                repetition_penalty=pick(batch.repetition_penalty), presence_penalty=pick(batch.presence_penalty),
                frequency_penalty=pick(batch.frequency_penalty), output_counts=batch.output_counts,
                seen=batch.seen)
    banned = None
    if batch.banned is not None:
        rows, ids = batch.banned
        inside = (rows >= start) & (rows < stop)
        if bool(inside.any()):
            banned = (rows[inside] - start, ids[inside])
    return SamplingBatch(
        logits_index=batch.logits_index[start:stop], temperature=part(batch.temperature),
        is_greedy=part(batch.is_greedy), seeds=part(batch.seeds), all_greedy=batch.all_greedy,
        any_greedy=batch.any_greedy, needs_gather=True, top_k=part(batch.top_k), top_p=part(batch.top_p),
        min_p=part(batch.min_p), banned=banned,
        allowed_mask=part(batch.allowed_mask), max_num_logprobs=batch.max_num_logprobs,
        raw_logprob_rows=part(batch.raw_logprob_rows), **penalties)


def concat_outputs(parts: list[SamplerOutput]) -> SamplerOutput:
    def cat(name):
        values = [getattr(p, name) for p in parts]
        return None if values[0] is None else torch.cat(values)

    return SamplerOutput(cat("token_ids"), cat("logprobs"), cat("top_ids"), cat("top_logprobs"))


def _uniform(seeds: torch.Tensor) -> torch.Tensor:
    """(0, 1) from the top 53 bits of each 63-bit seed."""
    return (((seeds >> 10).to(torch.float64) + 0.5) / float(2 ** 53)).to(torch.float32)


def _draw(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draw: the first token whose cumulative probability reaches u * total."""
    probs = torch.softmax(logits, dim=-1)
    cdf = probs.cumsum_(dim=-1)  # fp32: a token below ~1e-7 probability cannot be drawn, a negligible bias
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    token_ids = torch.searchsorted(cdf, target).squeeze(1)
    return token_ids.clamp_(max=logits.shape[-1] - 1)
