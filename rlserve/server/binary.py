"""The compact layout of a ``/generate/`` or ``/chat/`` answer, asked for with ``"response_format": "binary"``.

An RL batch answered in JSON is ~10 MB of nested lists (``logprobs`` is ``[sequence][token][entry]``), which the
server spends time writing and the client time parsing. The binary layout carries the same values as flat
little-endian numpy arrays, base64-encoded inside a small JSON object, with the lengths needed to cut them:

    prompt_ids_b64          int32, every prompt's ids one after another; prompt_lengths cuts them
    completion_ids_b64      int32, every completion's ids; completion_lengths cuts them
    logprobs_b64            per token, its entries (TRL's order); logprobs_dtype is "float32" when every value
                            is exactly a float32 (the engine's own precision), else "float64"; null when the
                            request had logprobs=None
    logprob_widths_b64      int32, entries per token; null for logprobs=0 (one entry: the sampled token)
    logprob_token_ids_b64   int32, the entries' token ids; null for logprobs=0 (they are the completion ids)

``finish_reasons``, ``weight_version`` and ``weight_versions`` are as in JSON. ``decode`` turns the answer back into
exactly the JSON answer's dict (same ids, bit-equal logprobs; a non-finite logprob becomes None, as JSON's null);
``decode_arrays`` into the same keys holding numpy arrays, for a trainer that makes tensors of them.
The server and ``rlserve.Client`` both use this module, so the two sides cannot drift apart.
"""

from __future__ import annotations

import base64
import contextlib
import gc
from itertools import chain

import numpy as np

FORMAT = "rlserve-binary-v1"


@contextlib.contextmanager
def gc_paused():
    """Build or parse a large answer without the cyclic garbage collector: its passes over the hundreds of
    thousands of small lists of an RL batch, not the work itself, were ~80% of encoding and decoding time
    (512 x 512 tokens with logprobs=0 on CPU: JSON round trip 1.9 s with, 0.29 s without). Lists of numbers
    form no cycles; the collector runs again after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def _array(text: str, dtype, writable: bool = False) -> np.ndarray:
    data = base64.b64decode(text)
    return np.frombuffer(bytearray(data) if writable else data, dtype=np.dtype(dtype).newbyteorder("<"))


def _flat_int32(rows: list[list[int]]) -> tuple[np.ndarray, list[int]]:
    lengths = [len(r) for r in rows]
    flat = np.fromiter(chain.from_iterable(rows), dtype="<i4", count=sum(lengths))  # C iteration: no genexpr
    return flat, lengths


def encode(prompt_ids: list[list[int]], completion_ids: list[list[int]], sampled_logprobs: list[list[float]] | None,
           top_entries: tuple[np.ndarray, np.ndarray, np.ndarray] | None, finish_reasons: list, weight_version: int,
           weight_versions: list[list[int]]) -> dict:
    """``sampled_logprobs``: per completion, the sampled token's logprob per token (logprobs=0); or
    ``top_entries``: TRL's [sequence][token][entry] layout (logprobs=N) flattened, as (values float64, token ids
    int32, entries per token int32; ``trl_logprobs.flat_entries``); neither: None."""
    prompts, prompt_lengths = _flat_int32(prompt_ids)
    completions, completion_lengths = _flat_int32(completion_ids)
    answer = {"format": FORMAT, "prompt_lengths": prompt_lengths, "prompt_ids_b64": _b64(prompts),
              "completion_lengths": completion_lengths, "completion_ids_b64": _b64(completions),
              "logprobs_b64": None, "logprobs_dtype": None, "logprob_widths_b64": None,
              "logprob_token_ids_b64": None, "finish_reasons": finish_reasons, "weight_version": weight_version,
              "weight_versions": weight_versions}
    if sampled_logprobs is not None:
        values = np.fromiter(chain.from_iterable(sampled_logprobs), dtype=np.float64, count=len(completions))
    elif top_entries is not None:
        values, ids, widths = top_entries
        answer["logprob_widths_b64"] = _b64(np.asarray(widths, dtype="<i4"))
        answer["logprob_token_ids_b64"] = _b64(np.asarray(ids, dtype="<i4"))
    else:
        return answer
    narrow = values.astype(np.float32)
    exact = np.array_equal(narrow.astype(np.float64), values, equal_nan=True)
    answer["logprobs_dtype"] = "float32" if exact else "float64"
    answer["logprobs_b64"] = _b64(narrow.astype("<f4") if exact else values.astype("<f8"))
    return answer


def _split(flat: np.ndarray, lengths: list[int]) -> list[list]:
    ends = np.cumsum(lengths)
    values = flat.tolist()
    return [values[end - n:end] for n, end in zip(lengths, ends.tolist())]


def decode(answer: dict, as_arrays: bool = False, num_logprobs: int | None = None) -> dict:
    """The JSON answer's dict (TRL's layout) from a binary answer. ``as_arrays``: the same keys, with numpy arrays
    in place of the nested lists (see ``decode_arrays``, which ``num_logprobs`` is for)."""
    if as_arrays:
        return decode_arrays(answer, num_logprobs)
    with gc_paused():
        return _decode(answer)


def decode_arrays(answer: dict, num_logprobs: int | None = None) -> dict:
    """A binary answer as numpy arrays, for a trainer that turns the answer into tensors anyway: building TRL's
    nested lists (two one-element lists per generated token for ``logprobs=0``) is most of the client's time on
    an RL batch, and these are views of the received buffers instead.

    ``prompt_ids[i]``, ``completion_ids[i]``: int32 arrays. ``sampled_logprobs[i]``: shape (tokens,), each sampled
    token's logprob (not in JSON's answer: taken from its entry; NaN if it has none). ``logprobs[i]``: shape
    (tokens, W), TRL's entries of each token in TRL's order -- for ``logprobs=N > 0`` sorted by value, so column 0
    is the most likely token, not always the sampled one. W is 1 for ``logprobs=0``, N + 1 for ``logprobs=N`` when
    ``num_logprobs=N`` is given (``Client.generate`` passes what it asked for: every answer then has the same width;
    an answer with wider rows keeps its width), else the most entries any token of this answer has. A token with
    fewer entries is padded with NaN in ``logprobs`` and -1 in ``logprob_token_ids[i]`` (int32, same shape):
    ``logprob_token_ids[i] >= 0`` is the mask of real entries (a real logprob can be NaN; JSON's answer has null for
    any non-finite one, these arrays keep the value). Values are float32 when every one is exactly a float32 (the
    engine's own precision: always, for its answers), else float64. ``logprobs``, ``logprob_token_ids`` and
    ``sampled_logprobs`` are None for ``logprobs=None``; the other keys are as in JSON. A sequence's arrays are
    views of one buffer per key for the whole answer."""
    if answer.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} answer (format {answer.get('format')!r})")
    lengths = answer["completion_lengths"]
    ends = np.cumsum(lengths, dtype=np.int64).tolist()
    completions = _array(answer["completion_ids_b64"], np.int32, writable=True)  # torch.from_numpy wants that
    result = {"prompt_ids": _split_array(_array(answer["prompt_ids_b64"], np.int32, writable=True),
                                         answer["prompt_lengths"]),
              "completion_ids": _split_array(completions, lengths, ends), "logprobs": None,
              "logprob_token_ids": None, "sampled_logprobs": None, "finish_reasons": answer["finish_reasons"],
              "weight_version": answer["weight_version"], "weight_versions": answer["weight_versions"]}
    if answer["logprobs_b64"] is None:
        return result
    values = _array(answer["logprobs_b64"], answer["logprobs_dtype"], writable=True)
    if answer["logprob_widths_b64"] is None:  # logprobs=0: one entry per token, the sampled one
        values, ids = values.reshape(-1, 1), completions.reshape(-1, 1).copy()  # its own memory, not completion_ids'
        sampled = values[:, 0].copy()
    else:
        widths = _array(answer["logprob_widths_b64"], np.int32)
        flat_ids = _array(answer["logprob_token_ids_b64"], np.int32)
        rows = np.repeat(np.arange(len(widths)), widths)
        columns = np.arange(len(flat_ids)) - np.repeat(np.cumsum(widths) - widths, widths)
        width = int(widths.max()) if len(widths) else 0
        if num_logprobs is not None and num_logprobs > 0:
            width = max(width, num_logprobs + 1)
        padded_values = np.full((len(widths), width), np.nan, dtype=values.dtype)
        padded_ids = np.full((len(widths), width), -1, dtype=np.int32)
        padded_values[rows, columns], padded_ids[rows, columns] = values, flat_ids
        values, ids = padded_values, padded_ids
        is_sampled = ids == completions[:, None]  # ids in a row are distinct: at most one match
        sampled = (np.where(is_sampled.any(axis=1), values[np.arange(len(ids)), is_sampled.argmax(axis=1)], np.nan)
                   if ids.size else np.empty(len(ids), values.dtype))  # no tokens: argmax of nothing would raise
    result["logprobs"] = _split_array(values, lengths, ends)
    result["logprob_token_ids"] = _split_array(ids, lengths, ends)
    result["sampled_logprobs"] = _split_array(sampled.astype(values.dtype, copy=False), lengths, ends)
    return result


def _split_array(flat: np.ndarray, lengths: list[int], ends: list[int] | None = None) -> list[np.ndarray]:
    """Views of ``flat``'s consecutive runs of ``lengths`` rows."""
    if ends is None:
        ends = np.cumsum(lengths, dtype=np.int64).tolist()
    return [flat[end - n:end] for n, end in zip(lengths, ends)]


def _decode(answer: dict) -> dict:
    if answer.get("format") != FORMAT:
        raise ValueError(f"not an {FORMAT} answer (format {answer.get('format')!r})")
    completion_lengths = answer["completion_lengths"]
    completion_ids = _split(_array(answer["completion_ids_b64"], np.int32), completion_lengths)
    result = {"prompt_ids": _split(_array(answer["prompt_ids_b64"], np.int32), answer["prompt_lengths"]),
              "completion_ids": completion_ids, "logprobs": None, "logprob_token_ids": None,
              "finish_reasons": answer["finish_reasons"], "weight_version": answer["weight_version"],
              "weight_versions": answer["weight_versions"]}
    if answer["logprobs_b64"] is None:
        return result
    values = _array(answer["logprobs_b64"], answer["logprobs_dtype"]).astype(np.float64)
    finite = bool(np.isfinite(values).all())
    if answer["logprob_widths_b64"] is None:  # logprobs=0: one entry per token, the sampled one
        # numpy builds the [[v], [v], ...] lists in C: the nested lists are most of the decoding time.
        entries = values.reshape(-1, 1).tolist()
        if not finite:
            entries = [[v if np.isfinite(v) else None] for (v,) in entries]
        token_entries = _array(answer["completion_ids_b64"], np.int32).reshape(-1, 1).tolist()
        bounds = list(zip(np.cumsum(completion_lengths).tolist(), completion_lengths))
        result["logprobs"] = [entries[end - n:end] for end, n in bounds]
        result["logprob_token_ids"] = [token_entries[end - n:end] for end, n in bounds]
        return result
    flat = values.tolist() if finite else [v if np.isfinite(v) else None for v in values.tolist()]
    widths = _array(answer["logprob_widths_b64"], np.int32).tolist()
    ids = _array(answer["logprob_token_ids_b64"], np.int32).tolist()
    value_rows, id_rows, entry, token = [], [], 0, 0
    for n in completion_lengths:
        values_of, ids_of = [], []
        for width in widths[token:token + n]:
            values_of.append(flat[entry:entry + width])
            ids_of.append(ids[entry:entry + width])
            entry += width
        token += n
        value_rows.append(values_of)
        id_rows.append(ids_of)
    result["logprobs"], result["logprob_token_ids"] = value_rows, id_rows
    return result
