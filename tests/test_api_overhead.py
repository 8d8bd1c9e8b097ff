"""The API process's serial work per batch made cheaper without changing a byte: TRL's /generate/ response
(JSON and binary) against the builders as they were before (kept here, verbatim, as the reference), on real
engine outputs and on edge cases; the replicas' ``SeqUpdate``s through pickle; a real server's answers
(/generate/ JSON and binary, /chat/, /v1/completions with logprobs, n > 1) equal to the offline engine's; and
``rlserve.bench.api_overhead`` on a tiny shape."""

from __future__ import annotations

import json
import math
import pickle

import httpx
import numpy as np
import orjson
import pytest

from rlserve import SamplingParams
from rlserve.engine import messages as msg
from rlserve.outputs import CompletionOutput, Logprob, RequestOutput, TopLogprobs
from rlserve.server import binary, trl_logprobs
from rlserve.server.routes_trl import binary_response, trl_response
from server_utils import running_server

TOKEN_PROMPTS = [[1, 2, 3], [200, 100, 50, 25, 12], list(range(30, 70))]
CONVERSATIONS = [[{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]]


# -- the builders before these changes (commits c165933, 1b97ee1), the reference ---------------------------
# logprobs=N: each completion's trl_logprobs(), the definition token by token, from its top_logprobs tuples.
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


def before_binary_response(outputs: list[RequestOutput], params: SamplingParams) -> dict:
    completions = [c for o in outputs for c in o.outputs]
    sampled = trl = None
    if params.logprobs == 0 and all(len(c.sampled_logprobs) == len(c.token_ids) for c in completions):
        sampled = [c.sampled_logprobs for c in completions]
    elif params.logprobs is not None:
        pairs = [c.trl_logprobs() for c in completions]
        trl = ([p[0] for p in pairs], [p[1] for p in pairs])
    versions = [c.weight_versions for c in completions]
    return before_binary_encode([o.prompt_token_ids for o in outputs], [c.token_ids for c in completions], sampled,
                                trl, [c.finish_reason for c in completions],
                                max((v for vs in versions for v in vs), default=0), versions)


def assert_same_bytes(outputs, params) -> None:
    assert orjson.dumps(trl_response(outputs, params)) == orjson.dumps(before_trl_response(outputs, params))
    assert orjson.dumps(binary_response(outputs, params)) == orjson.dumps(before_binary_response(outputs, params))
    assert_arrays_hold_the_json_answer(outputs, params)


def assert_arrays_hold_the_json_answer(outputs, params) -> None:
    """``binary.decode_arrays`` of the binary answer holds the JSON answer's values: ids equal, logprobs bit-equal
    (a non-finite one, null in JSON, non-finite), each token's entries first in its row and the rest NaN / -1."""
    as_json = orjson.loads(orjson.dumps(trl_response(outputs, params)))
    answer = orjson.loads(orjson.dumps(binary_response(outputs, params)))
    arrays = binary.decode_arrays(answer, params.logprobs)
    assert arrays.keys() == as_json.keys() | {"sampled_logprobs"}
    natural = binary.decode_arrays(answer)  # no width asked: the widest row's; the same entries
    for a, b in zip(natural["logprobs"] or [], arrays["logprobs"] or [], strict=True):
        assert a.shape[1] <= b.shape[1] and np.array_equal(a, b[:, :a.shape[1]], equal_nan=True)
    for key in ("finish_reasons", "weight_version", "weight_versions"):
        assert arrays[key] == as_json[key]
    for key in ("prompt_ids", "completion_ids"):
        assert all(a.dtype == np.int32 and a.flags.writeable for a in arrays[key])
        assert [a.tolist() for a in arrays[key]] == as_json[key]
    if as_json["logprobs"] is None:
        assert arrays["logprobs"] is None and arrays["logprob_token_ids"] is None and arrays["sampled_logprobs"] is None
        return
    # the sampled tokens' logprobs: the engine's own values, whichever column they are in
    completions = [c for o in outputs for c in o.outputs]
    for got, c in zip(arrays["sampled_logprobs"], completions, strict=True):
        assert got.shape == (len(c.token_ids),)
        np.testing.assert_array_equal(got.astype(np.float64), np.array(c.sampled_logprobs, dtype=np.float64))
    width = 1 if params.logprobs == 0 else params.logprobs + 1  # the same for every answer of these params
    for values, ids, json_values, json_ids in zip(arrays["logprobs"], arrays["logprob_token_ids"],
                                                  as_json["logprobs"], as_json["logprob_token_ids"], strict=True):
        assert values.shape == ids.shape == (len(json_values), width) and ids.dtype == np.int32
        for t, (entries, entry_ids) in enumerate(zip(json_values, json_ids)):
            n = len(entries)
            assert ids[t, :n].tolist() == entry_ids and (ids[t, n:] == -1).all() and np.isnan(values[t, n:]).all()
            for got, want in zip(values[t, :n].tolist(), entries):
                assert (not math.isfinite(got)) if want is None else (got == want and
                                                                       math.copysign(1, got) == math.copysign(1, want))


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
    assert_same_bytes([], SamplingParams(logprobs=3))


def test_completions_without_tokens_decode_to_empty_arrays():
    """logprobs=N and not one token in the answer (max_tokens=0, or every sample aborted first): empty arrays of
    the asked width, or of width 0 when none was asked."""
    empty = [CompletionOutput(i, [], finish_reason="length", sampled_logprobs=[], top_n=TopLogprobs(
        np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32))) for i in range(2)]
    outputs, params = [RequestOutput("r", None, [1, 2], empty, True)], SamplingParams(n=2, logprobs=2)
    assert_same_bytes(outputs, params)
    answer = orjson.loads(orjson.dumps(binary_response(outputs, params)))
    for width, arrays in ((3, binary.decode_arrays(answer, 2)), (0, binary.decode_arrays(answer))):
        assert [a.shape for a in arrays["logprobs"]] == [(0, width)] * 2
        assert [a.shape for a in arrays["sampled_logprobs"]] == [(0,)] * 2


def _top_n_batch(seed: int, num_top: int = 3) -> list[RequestOutput]:
    """logprobs=N as the engine makes them: n=2 samples of 3 prompts, ragged lengths (one sample aborted before
    its first token), fp32 top N by rank with distinct ids; the sampled token among them or not, ties, -0.0,
    -inf (a top-k cut, a sampled token outside it)."""
    rng = np.random.default_rng(seed)
    completions = []
    for i, length in enumerate([7, 0, 1, 12, 5, 3]):
        values = np.sort(-rng.exponential(2.0, (length, num_top)).astype(np.float32), axis=1)[:, ::-1].copy()
        ids = np.array([rng.permutation(50)[:num_top] for _ in range(length)], np.int32).reshape(length, num_top)
        tokens = [int(x) for x in rng.integers(0, 50, length)]
        sampled = []
        for t, token in enumerate(tokens):
            if t % 3 == 0:  # the sampled token among the top N, with the same fp32 logprob
                ids[t, t % num_top] = token
                ids[t] = np.where((ids[t] == token) & (np.arange(num_top) != t % num_top), 99, ids[t])
                sampled.append(float(values[t, t % num_top]))
            else:
                ids[t] = np.where(ids[t] == token, 98, ids[t])
                sampled.append(float(values[t, min(t, num_top - 1)]) if t % 4 == 1 else float(
                    np.float32(-rng.exponential(3.0))))  # a tie with an entry of the top N, or anywhere
        if length > 4:
            values[2, 1:] = -np.inf  # a top-k cut: the tail of the top N is -inf
            values[4] = 0.0  # a certain token: ties at 0.0 and -0.0
            values[4, -1] = -0.0
            sampled[2] = float("-inf") if ids[2, 0] != tokens[2] else sampled[2]
        completions.append(CompletionOutput(i % 2, tokens, finish_reason="length" if length else "abort",
                                            sampled_logprobs=sampled, top_n=TopLogprobs(ids, values),
                                            weight_versions=[0, 1]))
    return [RequestOutput(str(k), None, list(range(k + 1)), completions[2 * k:2 * k + 2], True) for k in range(3)]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_top", [1, 3, 5])
def test_logprobs_n_is_byte_identical_to_before(seed, num_top):
    outputs = _top_n_batch(seed, num_top)
    completions = [c for o in outputs for c in o.outputs]
    assert trl_logprobs.rank(completions)[1] == []  # every completion from the arrays
    assert_same_bytes(outputs, SamplingParams(n=2, logprobs=num_top))
    widths = {len(entries) for c in completions for entries in c.trl_logprobs()[0]}
    assert widths == {num_top, num_top + 1}  # the sampled token among the top N, and not


def test_logprobs_n_inputs_the_arrays_cannot_reproduce_are_built_by_the_definition():
    """Each case falls back to trl_logprobs for its completion alone; the bytes stay the definition's."""
    outputs = _top_n_batch(3)
    c = [c for o in outputs for c in o.outputs]
    c[0].top_n.ids[1, :2] = 7  # a token id twice in a row
    c[2].sampled_logprobs[0] = float("nan")
    c[3].top_n.logprobs[5] = c[3].top_n.logprobs[5][::-1].copy()  # not by rank: sorted as the definition does
    c[4].top_n = None  # no top N: the sampled entry alone
    c[5].token_ids[0] = 2 ** 40  # wider than int32 (the binary layout cannot carry it)
    assert trl_logprobs.rank(c)[1] == [0, 2, 5]
    assert orjson.dumps(trl_response(outputs, SamplingParams(n=2, logprobs=3))) == orjson.dumps(
        before_trl_response(outputs, SamplingParams(n=2, logprobs=3)))
    c[5].token_ids[0] = 1
    assert_same_bytes(outputs, SamplingParams(n=2, logprobs=3))
    c[1].token_ids.append(4)  # tokens but no top rows at all: the sampled entries alone
    c[1].sampled_logprobs.append(-1.0)
    c[1].top_n = TopLogprobs.empty(3)
    assert_same_bytes(outputs, SamplingParams(n=2, logprobs=3))
    c[1].token_ids.append(5)  # some rows missing: an error, as before
    c[1].sampled_logprobs.append(-2.0)
    c[1].top_n = TopLogprobs(np.zeros((1, 3), np.int32), np.zeros((1, 3), np.float32))
    with pytest.raises(IndexError):
        trl_response(outputs, SamplingParams(n=2, logprobs=3))


def test_completion_top_logprobs_are_tuples_by_rank():
    top = TopLogprobs(np.array([[5, 3], [1, 2]], np.int32), np.array([[-0.5, -1.25], [-0.1, -np.inf]], np.float32))
    c = CompletionOutput(0, [3, 9], sampled_logprobs=[-1.25, -7.0], top_n=top)
    assert c.top_logprobs == [[(5, -0.5), (3, -1.25)], [(1, -0.10000000149011612), (2, float("-inf"))]]
    assert all(type(t) is int and type(v) is float for row in c.top_logprobs for t, v in row)
    assert c.top_logprobs is c.top_logprobs  # built once
    assert c.logprobs[0][3] == Logprob(-1.25, 2) and c.logprobs[1][9] == Logprob(-7.0)
    assert c.trl_logprobs() == ([[-0.5, -1.25], [-0.10000000149011612, -7.0, float("-inf")]], [[5, 3], [1, 9, 2]])
    c.top_n = TopLogprobs(top.ids[:1], top.logprobs[:1])
    assert len(c.top_logprobs) == 1  # ... and again for new arrays
    assert CompletionOutput(0).top_logprobs is None


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
    for fmt in ("json", "binary", "openai"):
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
    msg.SeqUpdate("r-0", 2, [5, 0, 151935], [-0.5, -1 / 3, -1e-300],
                  TopLogprobs(np.array([[5], [0], [7]], np.int32), np.array([[-0.5], [-0.2], [-np.inf]], np.float32)),
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
    if update.top_logprobs is not None:  # the top N: two arrays, whole
        assert back.top_logprobs.ids.dtype == np.int32 and back.top_logprobs.logprobs.dtype == np.float32
        assert back.top_logprobs.pairs() == update.top_logprobs.pairs()


def test_seq_update_nan_logprobs_survive_pickle():
    back = pickle.loads(pickle.dumps(msg.SeqUpdate("r", 0, [1, 2], [float("nan"), -0.0])))
    assert math.isnan(back.sampled_logprobs[0]) and math.copysign(1, back.sampled_logprobs[1]) == -1
