"""TRL's logprobs=N layout, built from the engine's top-N arrays for a whole batch at once.

TRL wants, per token, up to N+1 entries: the top N and the sampled token (its own logprob wins when it is among
them), sorted by descending logprob, ties in insertion order (by rank, the sampled token last when it was not
among the top N). ``CompletionOutput.trl_logprobs`` is that definition, token by token in Python; for an RL batch
(512 x 512 tokens, N = 5) it made 1.3M tuples and 262k small lists, about half a second. Here the same entries
come from [R, N+1] arrays (R: the batch's tokens): the top N are sorted already (the sampler's top-k is by rank),
so only a sampled token outside them has to be put in its place, with array operations over all such rows at
once (a row that is not sorted gets a stable argsort). They leave as bytes (JSON: an ``orjson.Fragment`` per
sequence) or flat arrays (the binary layout), without a Python object per token.

Rows whose sampled token is among the top N have N entries, the others N+1: every row is N+1 wide, and a
padding entry (``PAD_VALUE``, ``PAD_ID``) ends an N-entry row. JSON drops it from the bytes (``,1e+300]`` stands
for no logprob: no float32 is 1e300, and a row holding that value is left to Python). A completion the arrays
cannot reproduce exactly -- NaN (Python's sort and numpy's disagree), a token id twice in a row, the padding's
values, an id wider than int32, lengths that disagree -- is built by ``trl_logprobs`` instead, so that the
output is the definition's for every input.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import orjson

from rlserve.outputs import CompletionOutput

PAD_VALUE = 1e300  # no float32 is this: never a logprob the engine made
PAD_ID = -1
_PAD_VALUE_TEXT = b"," + orjson.dumps(PAD_VALUE) + b"]"
_PAD_ID_TEXT = b"," + orjson.dumps(PAD_ID) + b"]"


@dataclass
class _Ranked:
    """The TRL entries of the completions of one top width N, their rows one after another: row r's first
    ``widths[r]`` entries (N or N+1) are its token's, sorted; an N-entry row ends with the padding."""
    rows: dict[int, tuple[int, int]]  # completion index -> (first row, end row), for those built from here
    values: np.ndarray  # [R, N+1] float64
    ids: np.ndarray  # [R, N+1] int32
    widths: np.ndarray  # [R] int64


def rank(completions: list[CompletionOutput]) -> tuple[list[_Ranked], list[int]]:
    """The batch's completions in TRL's order, grouped by top width; and the completions left to
    ``trl_logprobs`` (see the module docstring)."""
    groups: dict[int, list[int]] = {}
    irregular = []
    for i, c in enumerate(completions):
        top, num_tokens = c.top_n, len(c.token_ids)
        num_rows = 0 if top is None else len(top)
        if c.sampled_logprobs is None or len(c.sampled_logprobs) != num_tokens or num_rows not in (0, num_tokens):
            irregular.append(i)
        else:  # no top rows: every token has its sampled entry alone, as in trl_logprobs
            groups.setdefault(top.num_top if num_rows else 0, []).append(i)
    ranked = []
    for num_top, members in groups.items():
        group = _rank_group(completions, members, num_top)
        irregular += [i for i in members if i not in group.rows]
        ranked.append(group)
    return ranked, sorted(irregular)


def _rank_group(completions: list[CompletionOutput], members: list[int], num_top: int) -> _Ranked:
    group = [completions[i] for i in members]
    lengths = [len(c.token_ids) for c in group]
    num_rows = sum(lengths)
    try:
        wide_tokens = np.fromiter(chain.from_iterable(c.token_ids for c in group), np.int64, num_rows)
        sampled = np.fromiter(chain.from_iterable(c.sampled_logprobs for c in group), np.float64, num_rows)
    except (OverflowError, TypeError, ValueError):  # ids beyond int64, a logprob that is no number
        return _Ranked({}, np.zeros((0, 1)), np.zeros((0, 1), np.int32), np.zeros(0, np.int64))
    tokens = wide_tokens.astype(np.int32)  # the binary layout's ids; a row with a wider one is left to Python
    # Column by column ([N, R], each rank contiguous): the comparisons below run along rows of R values.
    if num_top and num_rows:
        top_ids = np.concatenate([c.top_n.ids for c in group if c.token_ids]).T.astype(np.int32)
        top_values = np.concatenate([c.top_n.logprobs for c in group if c.token_ids]).T.astype(np.float64)
    else:
        top_ids, top_values = np.zeros((num_top, num_rows), np.int32), np.zeros((num_top, num_rows))
    is_sampled = top_ids == tokens  # [N, R]: where the sampled token is among the top N
    in_top = np.logical_or.reduce(is_sampled, axis=0)
    merged = np.where(is_sampled, sampled, top_values)  # [N, R]; its own logprob wins
    unsorted = np.logical_or.reduce(merged[1:] > merged[:-1], axis=0)  # never from the sampler's top N
    bad = (np.isnan(sampled) | np.logical_or.reduce(np.isnan(top_values) | (top_values == PAD_VALUE), axis=0)
           | (sampled == PAD_VALUE) | (tokens == PAD_ID) | np.logical_or.reduce(top_ids == PAD_ID, axis=0)
           | (tokens != wide_tokens))
    if num_top > 1:  # a token id twice: trl_logprobs's dict keeps its first place, last value (one sort, not N^2)
        ranked = np.sort(top_ids, axis=0)
        bad |= np.logical_or.reduce(ranked[1:] == ranked[:-1], axis=0)
    # Row by row ([R, N+1]), the entries in the order trl_logprobs's dict has them: the top N by rank, then the
    # sampled entry or the padding. Sorted stably by -logprob: the top N are in order already, and the sampled
    # entry goes after every one at least as likely (it came last); the padding stays at the end.
    values = np.empty((num_rows, num_top + 1))
    values[:, :num_top] = merged.T
    values[:, num_top] = np.where(in_top, PAD_VALUE, sampled)
    ids = np.empty((num_rows, num_top + 1), np.int32)
    ids[:, :num_top] = top_ids.T
    ids[:, num_top] = np.where(in_top, PAD_ID, tokens)
    outside = np.flatnonzero(~in_top & ~unsorted)
    if len(outside) and num_top:
        at = (values[outside, :num_top] >= sampled[outside, None]).sum(axis=1)[:, None]
        values[outside] = _insert(values[outside, :num_top], sampled[outside], at)
        ids[outside] = _insert(ids[outside, :num_top], tokens[outside], at)
    if unsorted.any():
        rows = np.flatnonzero(unsorted)
        keys = -values[rows]
        keys[in_top[rows], num_top] = np.inf  # the padding last of all (+inf, and last in)
        order = np.argsort(keys, axis=1, kind="stable")
        values[rows] = np.take_along_axis(values[rows], order, axis=1)
        ids[rows] = np.take_along_axis(ids[rows], order, axis=1)
    ends = np.cumsum(lengths).tolist()
    num_bad = np.cumsum(bad).tolist()
    rows, start = {}, 0
    for i, end in zip(members, ends):
        if end == start or num_bad[end - 1] == (num_bad[start - 1] if start else 0):
            rows[i] = (start, end)
        start = end
    return _Ranked(rows, values, ids, num_top + 1 - in_top)


def _insert(top: np.ndarray, extra: np.ndarray, at: np.ndarray) -> np.ndarray:
    """[K, N+1]: each row of ``top`` [K, N] with ``extra`` [K] put in at column ``at`` [K, 1]."""
    column = np.arange(top.shape[1] + 1)
    before = np.concatenate([top, extra[:, None]], axis=1)
    after = np.concatenate([extra[:, None], top], axis=1)  # after[:, j] = top[:, j - 1]
    return np.where(column < at, before, np.where(column == at, extra[:, None], after))


def json_rows(completions: list[CompletionOutput]) -> tuple[list, list]:
    """TRL's ``logprobs`` and ``logprob_token_ids`` ([sequence][token][entry]) for logprobs=N: per sequence an
    ``orjson.Fragment`` with exactly the bytes orjson writes for ``trl_logprobs``'s lists (orjson formats a
    numpy float64 or int32 as it does a Python float or int), or those lists themselves for one left to it."""
    ranked, irregular = rank(completions)
    values: list = [None] * len(completions)
    ids: list = [None] * len(completions)
    for group in ranked:
        padded = group.widths < group.values.shape[1]
        for i, (start, end) in group.rows.items():
            values[i] = _fragment(group.values[start:end], padded[start:end], _PAD_VALUE_TEXT)
            ids[i] = _fragment(group.ids[start:end], padded[start:end], _PAD_ID_TEXT)
    for i in irregular:
        values[i], ids[i] = completions[i].trl_logprobs()
    return values, ids


def _fragment(rows: np.ndarray, padded: np.ndarray, pad_text: bytes) -> orjson.Fragment:
    text = orjson.dumps(rows, option=orjson.OPT_SERIALIZE_NUMPY)  # [[a,b,...],...]; a 0-row array: []
    return orjson.Fragment(text.replace(pad_text, b"]") if padded.any() else text)


def flat_entries(completions: list[CompletionOutput]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The binary layout's logprobs=N arrays: every entry's value (float64) and token id (int32), sequence by
    sequence and token by token, and the number of entries of each token (int32)."""
    ranked, irregular = rank(completions)
    pieces: list = [None] * len(completions)
    for group in ranked:
        keep = np.arange(group.values.shape[1]) < group.widths[:, None]  # [R, N+1]: all but the padding
        values, ids = group.values[keep], group.ids[keep]
        entry_starts = np.concatenate([[0], np.cumsum(group.widths)]).tolist()
        if len(group.rows) == len(completions):  # the usual batch: one width, every completion regular
            return values, ids, group.widths.astype("<i4")
        for i, (start, end) in group.rows.items():
            a, b = entry_starts[start], entry_starts[end]
            pieces[i] = (values[a:b], ids[a:b], group.widths[start:end])
    for i in irregular:
        value_rows, id_rows = completions[i].trl_logprobs()
        widths = [len(entries) for entries in value_rows]
        pieces[i] = (np.fromiter(chain.from_iterable(value_rows), np.float64, sum(widths)),
                     np.fromiter(chain.from_iterable(id_rows), "<i4", sum(widths)), np.asarray(widths, np.int64))
    if not pieces:
        return np.zeros(0), np.zeros(0, "<i4"), np.zeros(0, "<i4")
    return (np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]).astype("<i4"),
            np.concatenate([p[2] for p in pieces]).astype("<i4"))
