"""TRL's client-side decoding of teacher-scoring answers, copied unchanged from TRL's ``VLLMClient`` (Apache
License 2.0, Copyright The HuggingFace Team) so that the tests read the server's answers exactly as a trainer
does: ``_decode_binary_logprobs`` from TRL 1.10 (``/get_sequence_logprobs/``) and ``_format_sequence_logprobs``
from TRL 1.16 (``/v1/completions`` with ``prompt_logprobs``)."""

import base64
import math


def _decode_binary_logprobs(response: dict) -> dict[str, list]:
    """Decode base64-encoded numpy arrays back to nested lists.

    Returns a dict with:
        ``logprobs`` / ``logprob_token_ids`` — teacher's sorted top-k logprobs and
            token IDs (shape per sequence: ``(comp_len, top_k)``). Used for the forward KL term.
        ``actual_logprobs`` / ``actual_token_ids`` — teacher logprob for the actual
            token at each position (shape per sequence: ``(comp_len, 1)``). Used for the reverse KL term.
    """
    import numpy as np

    shape = response["shape"]  # [batch, max_comp_len, top_k]
    comp_lengths = response["completion_lengths"]

    logprobs_arr = np.frombuffer(base64.b64decode(response["logprobs_b64"]), dtype=np.float32).reshape(shape)
    token_ids_arr = np.frombuffer(base64.b64decode(response["token_ids_b64"]), dtype=np.int32).reshape(shape)

    # Convert back to nested lists, trimming padding
    all_logprobs = []
    all_token_ids = []
    for i, comp_len in enumerate(comp_lengths):
        all_logprobs.append(logprobs_arr[i, :comp_len, :].tolist())
        all_token_ids.append(token_ids_arr[i, :comp_len, :].tolist())

    result = {"logprobs": all_logprobs, "logprob_token_ids": all_token_ids}

    # Decode actual-token logprobs (for reverse KL)
    if "actual_logprobs_b64" in response:
        actual_shape = [shape[0], shape[1], 1]
        actual_lp = np.frombuffer(base64.b64decode(response["actual_logprobs_b64"]), dtype=np.float32).reshape(
            actual_shape
        )
        actual_ids = np.frombuffer(base64.b64decode(response["actual_token_ids_b64"]), dtype=np.int32).reshape(
            actual_shape
        )
        all_actual_lps = []
        all_actual_ids = []
        for i, comp_len in enumerate(comp_lengths):
            all_actual_lps.append(actual_lp[i, :comp_len, :].tolist())
            all_actual_ids.append(actual_ids[i, :comp_len, :].tolist())
        result["actual_logprobs"] = all_actual_lps
        result["actual_token_ids"] = all_actual_ids

    return result


def _format_sequence_logprobs(choice: dict, sequence: list[int], prompt_length: int, top_logprobs: int) -> dict:
    """Slice the completion region out of a choice's prompt logprobs, sort it by rank and pad it to `top_logprobs`."""
    logprobs, logprob_token_ids, actual_logprobs, actual_token_ids = [], [], [], []
    for position in range(prompt_length, len(choice["prompt_logprobs"])):
        position_logprobs = choice["prompt_logprobs"][position] or {}
        items = sorted(position_logprobs.items(), key=lambda item: item[1]["rank"])[:top_logprobs]
        values = [-math.inf if math.isnan(item["logprob"]) else item["logprob"] for _, item in items]
        token_ids = [int(token_id) for token_id, _ in items]
        # Pad so that every position has exactly `top_logprobs` entries, as callers index it as an array.
        logprobs.append(values + [-math.inf] * (top_logprobs - len(values)))
        logprob_token_ids.append(token_ids + [0] * (top_logprobs - len(token_ids)))
        actual = position_logprobs.get(str(sequence[position]))
        actual_logprobs.append(
            [-math.inf if actual is None or math.isnan(actual["logprob"]) else actual["logprob"]]
        )
        actual_token_ids.append([sequence[position]])
    return {
        "logprobs": logprobs,
        "logprob_token_ids": logprob_token_ids,
        "actual_logprobs": actual_logprobs,
        "actual_token_ids": actual_token_ids,
    }
