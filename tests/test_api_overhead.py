"""The API process's serial work per batch made cheaper without changing a byte: TRL's /generate/ response
(JSON and binary) against the builders as they were before (kept here, verbatim, as the reference), on real
engine outputs and on edge cases; the replicas' ``SeqUpdate``s through pickle; a real server's answers
(/generate/ JSON and binary, /chat/, /v1/completions with logprobs, n > 1) equal to the offline engine's; and
``rlserve.bench.api_overhead`` on a tiny shape."""

from __future__ import annotations

import json
import math
import pickle
from unittest import mock

import httpx
import numpy as np
import orjson
import pytest

from rlserve import SamplingParams
from rlserve.engine import messages as msg
from rlserve.outputs import CompletionOutput, RequestOutput
from rlserve.server import binary
from rlserve.server.routes_trl import binary_response, trl_response
from server_utils import running_server

TOKEN_PROMPTS = [[1, 2, 3], [200, 100, 50, 25, 12], list(range(30, 70))]
CONVERSATIONS = [[{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]]


# -- the builders before this change (commit c165933), the reference ----------------------------------------
def before_trl_response(outputs: list[RequestOutput], params: SamplingParams) -> dict:
    completions = [c for o in outputs for c in o.outputs]
    logprobs = ids = None
    if params.logprobs == 0:
        logprobs = [[[lp] for lp in c.sampled_logprobs] for c in completions]
        ids = [[[t] for t in c.token_ids] for c in completions]
    elif params.logprobs is not None:
        pairs = [c.trl_logprobs() for c in completions]
        logprobs, ids = [p[0] for p in pairs], [p[1] for p in pairs]
    versions = [c.weight_versions for c in completions]
    return {"prompt_ids": [o.prompt_token_ids for o in outputs], "completion_ids": [c.token_ids for c in completions],
            "logprobs": logprobs, "logprob_token_ids": ids, "finish_reasons": [c.finish_reason for c in completions],
            "weight_version": max((v for vs in versions for v in vs), default=0), "weight_versions": versions}


def _before_flat_int32(rows):
    lengths = [len(r) for r in rows]
    return np.fromiter((t for r in rows for t in r), dtype="<i4", count=sum(lengths)), lengths


def before_binary_encode(prompt_ids, completion_ids, sampled_logprobs, trl_logprobs, finish_reasons, weight_version,
                         weight_versions) -> dict:
    prompts, prompt_lengths = _before_flat_int32(prompt_ids)
    completions, completion_lengths = _before_flat_int32(completion_ids)
    answer = {"format": binary.FORMAT, "prompt_lengths": prompt_lengths, "prompt_ids_b64": binary._b64(prompts),
              "completion_lengths": completion_lengths, "completion_ids_b64": binary._b64(completions),
              "logprobs_b64": None, "logprobs_dtype": None, "logprob_widths_b64": None,
              "logprob_token_ids_b64": None, "finish_reasons": finish_reasons, "weight_version": weight_version,
              "weight_versions": weight_versions}
    if sampled_logprobs is not None:
        values = np.fromiter((v for row in sampled_logprobs for v in row), dtype=np.float64, count=len(completions))
    elif trl_logprobs is not None:
        value_rows, id_rows = trl_logprobs
        widths = [len(entries) for row in value_rows for entries in row]
        values = np.fromiter((v for row in value_rows for entries in row for v in entries), dtype=np.float64,
                             count=sum(widths))
        ids = np.fromiter((t for row in id_rows for entries in row for t in entries), dtype="<i4", count=sum(widths))
        answer["logprob_widths_b64"] = binary._b64(np.asarray(widths, dtype="<i4"))
        answer["logprob_token_ids_b64"] = binary._b64(ids)
    else:
        return answer
    narrow = values.astype(np.float32)
    exact = np.array_equal(narrow.astype(np.float64), values, equal_nan=True)
    answer["logprobs_dtype"] = "float32" if exact else "float64"
    answer["logprobs_b64"] = binary._b64(narrow.astype("<f4") if exact else values.astype("<f8"))
    return answer


def assert_same_bytes(outputs, params) -> None:
    assert orjson.dumps(trl_response(outputs, params)) == orjson.dumps(before_trl_response(outputs, params))
    after = orjson.dumps(binary_response(outputs, params))
    with mock.patch.object(binary, "encode", before_binary_encode):  # the same builder on the encoder as it was
        assert after == orjson.dumps(binary_response(outputs, params))


# -- the builders: byte-for-byte as before ----------------------------------------------------------------
@pytest.mark.parametrize("logprobs", [0, 2, None])
def test_responses_of_real_outputs_are_byte_identical_to_before(llm, logprobs):
    params = SamplingParams(n=3, max_tokens=9, temperature=1.0, logprobs=logprobs, seed=7)
    outputs = llm.generate(TOKEN_PROMPTS, params)
    assert_same_bytes(outputs, params)


def _synthetic(rows: list[list[float] | None], tokens: list[list[int]], **kwargs) -> list[RequestOutput]:
    completions = [CompletionOutput(i, t, finish_reason="length", sampled_logprobs=lp, weight_versions=[0, 2])
                   for i, (t, lp) in enumerate(zip(tokens, rows))]
    return [RequestOutput("r", None, [5, 6], completions[:2], True), RequestOutput("s", None, [7], completions[2:])]


@pytest.mark.parametrize("rows", [
    [[-0.5, -1e-7], [], [-3.0, -2.5e-5, -1e20], [-0.0]],  # an empty completion among others, exponents, -0.0
    [[], [], [], []],  # every completion empty (aborted before their first token)
    [[float("nan"), float("-inf")], [-1.0], [float("inf"), -2.0, 0.1], [-0.1]],  # non-finite: null in JSON
    [[-1 / 3, -2 / 3], [-0.1], [-123456.789, -1e-300, -5e-324], [-1.5]],  # not float32 values: float64 in binary
])
def test_logprobs_0_edge_cases_are_byte_identical_to_before(rows):
    tokens = [list(range(len(r))) for r in rows]
    assert_same_bytes(_synthetic(rows, tokens), SamplingParams(n=2, logprobs=0))
    assert_same_bytes(_synthetic([None] * 4, tokens), SamplingParams(n=2, logprobs=None))


def test_an_empty_batch_is_byte_identical_to_before():
    assert_same_bytes([], SamplingParams(logprobs=0))


# -- the real server: values equal to the offline engine -------------------------------------------------
@pytest.fixture(scope="module")
def http(tiny_model):
    with running_server(tiny_model) as s, httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def _post(http, path: str, body: dict) -> httpx.Response:
    http.post("/reset_prefix_cache/").raise_for_status()  # cold, as the offline engine's first run of them
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r


@pytest.mark.parametrize("logprobs", [0, 2, None])
def test_generate_json_and_binary_equal_the_offline_engine(http, llm, logprobs):
    """n > 1, seeded: the server's answers are the offline engine's outputs through the reference builder (ids
    equal, logprobs to fp noise), and the JSON bytes are exactly the reference encoding of what they carry."""
    body = dict(prompts=TOKEN_PROMPTS, n=3, max_tokens=9, temperature=1.0, logprobs=logprobs,
                generation_kwargs={"seed": 7})
    params = SamplingParams(n=3, max_tokens=9, temperature=1.0, logprobs=logprobs, seed=7)
    llm.engine.reset_prefix_cache()
    want = before_trl_response(llm.generate(TOKEN_PROMPTS, params), params)
    as_json = _post(http, "/generate/", body)
    got = as_json.json()
    as_binary = binary.decode(_post(http, "/generate/", dict(body, response_format="binary")).json())
    for answer in (got, as_binary):
        assert_close(answer, want)
    assert as_binary == got  # bit-equal logprobs
    if logprobs == 0:  # the reference encoding of the answer's own values, byte for byte
        completions = [CompletionOutput(i, ids, sampled_logprobs=[lp for (lp,) in lps], finish_reason=reason,
                                        weight_versions=versions) for i, (ids, lps, reason, versions) in
                       enumerate(zip(got["completion_ids"], got["logprobs"], got["finish_reasons"],
                                     got["weight_versions"]))]
        outputs = [RequestOutput(str(i), None, ids, completions[3 * i:3 * i + 3], True)
                   for i, ids in enumerate(got["prompt_ids"])]
        assert as_json.content == orjson.dumps(before_trl_response(outputs, params))


def assert_close(answer: dict, want: dict) -> None:
    for key in ("prompt_ids", "completion_ids", "logprob_token_ids", "finish_reasons", "weight_version",
                "weight_versions"):
        assert answer[key] == want[key], key
    if want["logprobs"] is None:
        assert answer["logprobs"] is None
        return
    flat = [v for row in answer["logprobs"] for entries in row for v in entries]
    assert flat == pytest.approx([v for row in want["logprobs"] for entries in row for v in entries], abs=1e-5)


def test_chat_equals_the_offline_engine(http, llm):
    body = dict(messages=CONVERSATIONS, n=2, max_tokens=8, temperature=1.0, logprobs=0, generation_kwargs={"seed": 4})
    params = SamplingParams(n=2, max_tokens=8, temperature=1.0, logprobs=0, seed=4)
    llm.engine.reset_prefix_cache()
    want = before_trl_response(llm.chat(CONVERSATIONS, params), params)
    for fmt in ("json", "binary"):
        answer = _post(http, "/chat/", dict(body, response_format=fmt)).json()
        assert_close(binary.decode(answer) if fmt == "binary" else answer, want)


def test_v1_completions_with_logprobs_and_n_equal_the_offline_engine(http, llm, tiny_model):
    r = _post(http, "/v1/completions", dict(model=tiny_model, prompt=TOKEN_PROMPTS[:2], n=2, max_tokens=6,
                                            temperature=1.0, seed=3, logprobs=2, return_token_ids=True))
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    llm.engine.reset_prefix_cache()
    outputs = llm.generate(TOKEN_PROMPTS[:2], SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=3, logprobs=2))
    want = [c for o in outputs for c in o.outputs]
    assert len(choices) == len(want) == 4
    for choice, c in zip(choices, want):
        assert choice["text"] == c.text and choice["token_ids"] == c.token_ids
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(c.token_ids)
        assert lp["token_logprobs"] == pytest.approx(c.sampled_logprobs, abs=1e-5)
        assert all(1 <= len(top) <= 3 for top in lp["top_logprobs"])  # top 2 + the sampled one; names may collide


# -- the bench --------------------------------------------------------------------------------------------
def test_api_overhead_bench_on_a_tiny_shape(tmp_path, capsys):
    from rlserve.bench import api_overhead
    out = tmp_path / "ao.json"
    for fmt in ("json", "binary"):
        result = api_overhead.main(["--prompts", "4", "--n", "2", "--tokens", "16", "--repeats", "2",
                                    "--response_format", fmt, "--output", str(out)])
        saved = json.loads(out.read_text())
        assert saved["median"] == result["median"] and saved["response_format"] == fmt
        stages = result["median"]
        assert all(v >= 0 for v in stages.values()) and stages["total_ms"] > 0
        assert len(result["runs"]) == 2 and result["replicas"] == 2
        for run in result["runs"]:  # the stages add up to the total
            assert math.isclose(run["total_ms"], sum(run[k] for k in api_overhead.STAGES[:-1]), rel_tol=1e-6)
    printed = capsys.readouterr().out
    assert "receive unpickle" in printed and "serial part" in printed


# -- the replicas' messages -------------------------------------------------------------------------------
@pytest.mark.parametrize("update", [
    msg.SeqUpdate("r-0", 2, [5, 0, 151935], [-0.5, -1 / 3, -1e-300], [[(5, -0.5)], [(0, -0.2)], []],
                  finish_reason="length", stop_reason=7, weight_versions=[0, 3], num_cached_tokens=16, text="cut"),
    msg.SeqUpdate("r-1", 0, [2 ** 40, -1], None),  # beyond int32: still exact
    msg.SeqUpdate("r-2", 1, [], []),  # aborted before its first token
    msg.SeqUpdate("r-3", 0, [9], [float("-inf")], finish_reason="abort"),
])
def test_seq_updates_come_out_of_pickle_as_they_went_in(update):
    """What the API process gets from a replica: lists of the same values (a packed wire format must keep this)."""
    back = pickle.loads(pickle.dumps(msg.StepOutputs(0, [update]))).updates[0]
    assert back == update
    assert type(back.token_ids) is list and all(type(t) is int for t in back.token_ids)
    if update.sampled_logprobs is not None:
        assert type(back.sampled_logprobs) is list and all(type(v) is float for v in back.sampled_logprobs)


def test_seq_update_nan_logprobs_survive_pickle():
    back = pickle.loads(pickle.dumps(msg.SeqUpdate("r", 0, [1, 2], [float("nan"), -0.0])))
    assert math.isnan(back.sampled_logprobs[0]) and math.copysign(1, back.sampled_logprobs[1]) == -1
