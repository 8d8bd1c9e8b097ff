"""The HTTP server through a real ``rlserve serve`` process: TRL's protocol (shapes, logprobs layouts,
generation_kwargs overrides), outputs equal to the offline ``LLM``, concurrent requests batched in shared
engine steps, data parallelism, 400s that name the field, client disconnects that free their KV blocks, the
``serve`` flags of ``trl vllm-serve``, and ``rlserve.Client``.

Three servers per module (each start is a few seconds on CPU): a default one, one with ``--max_model_len 64``
for the length checks, and one with ``--data_parallel_size 2``.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from rlserve import Client, SamplingParams
from rlserve.client.client import ServerError
from server_utils import free_port, running_server

TEXT_PROMPTS = ["Hello, my name is", "The capital of France is", "a", "RL needs many samples, fast"]
TOKEN_PROMPTS = [[1, 2, 3], [200, 100, 50, 25, 12], list(range(30, 70)), [255]]
CONVERSATIONS = [[{"role": "user", "content": "hi"}],
                 [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]]


# -- fixtures and helpers ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def short_http(tiny_model):
    """A server with --max_model_len 64, for the length checks."""
    with running_server(tiny_model, "--max_model_len", "64") as s, \
            httpx.Client(base_url=s.url, timeout=60) as c:
        yield c


def generate(http, path="/generate/", **body) -> dict:
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def offline(llm, prompts, **params):
    """The offline engine's token ids, flattened like TRL's completion_ids (grouped by prompt)."""
    return [c.token_ids for o in llm.generate(prompts, SamplingParams(**params)) for c in o.outputs]


def replica_stats(http) -> list[dict]:
    return http.get("/server_info/").json()["replicas"]


def wait_idle(http, timeout: float = 30.0) -> list[dict]:
    """Poll /server_info/ until no replica holds a KV block or a sequence; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        replicas = replica_stats(http)
        if all(r["kv_blocks_used"] == 0 and r["num_running"] == 0 and r["num_waiting"] == 0 for r in replicas):
            return replicas
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout}s: {replicas}")
        time.sleep(0.1)


def assert_serves(http, path="/generate/") -> None:
    """A normal request succeeds (after every negative test)."""
    if path == "/chat/":
        out = generate(http, path, messages=[CONVERSATIONS[0]], max_tokens=2, temperature=0)
    else:
        out = generate(http, path, prompts=["ok"], max_tokens=2, temperature=0)
    assert len(out["completion_ids"]) == 1 and 1 <= len(out["completion_ids"][0]) <= 2


def assert_error(r: httpx.Response, status: int, field: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == status and isinstance(error["message"], str) and error["message"]
    if status == 400:
        assert error["type"] == "invalid_request_error"
    if field is not None:
        assert field in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    return error


# -- health, world size, cache reset, paths -----------------------------------------------------------
def test_health_world_size_reset_and_optional_trailing_slash(http):
    for path in ("/health", "/health/"):
        r = http.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    for path in ("/get_world_size", "/get_world_size/"):
        assert http.get(path).json() == {"world_size": 1}  # tp 1 x dp 1
    for path in ("/reset_prefix_cache", "/reset_prefix_cache/"):
        r = http.post(path)
        assert r.status_code == 200 and "message" in r.json()
    with_slash = generate(http, "/generate/", prompts=TEXT_PROMPTS[:2], max_tokens=4, temperature=0)
    without = generate(http, "/generate", prompts=TEXT_PROMPTS[:2], max_tokens=4, temperature=0)
    assert with_slash["completion_ids"] == without["completion_ids"]
    chat = generate(http, "/chat", messages=CONVERSATIONS[:1], max_tokens=3, temperature=0)
    assert len(chat["completion_ids"]) == 1
    info = http.get("/server_info").json()
    assert info["status"] == "serving" and info["world_size"] == 1 and info["engine"]["vocab_size"] == 259


def test_unknown_route_and_wrong_method_answer_json(http):
    assert_error(http.get("/no_such_route/"), 404)
    assert_error(http.post("/v1/no_such_route"), 404)
    assert_error(http.get("/generate/"), 405)  # a POST route
    assert_serves(http)


# -- TRL's /generate/ and /chat/ -------------------------------------------------------------------------
def test_generate_shapes_with_logprobs_0(http, llm):
    out = generate(http, prompts=TEXT_PROMPTS[:3], n=2, max_tokens=6, temperature=1.0, logprobs=0,
                   generation_kwargs={"seed": 11})
    assert out["prompt_ids"] == [list(p.encode()) for p in TEXT_PROMPTS[:3]]  # byte tokenizer, no BOS
    completions = out["completion_ids"]
    assert len(completions) == 3 * 2 and all(len(c) == 6 for c in completions)
    # grouped by prompt: [p0 s0, p0 s1, p1 s0, ...], exactly as the offline engine orders them
    assert completions == offline(llm, TEXT_PROMPTS[:3], n=2, max_tokens=6, temperature=1.0, seed=11)
    assert completions[0] != completions[1]  # two different samples of one prompt
    logprobs, ids = out["logprobs"], out["logprob_token_ids"]
    assert len(logprobs) == len(ids) == len(completions)
    for lp, tid, c in zip(logprobs, ids, completions):
        assert len(lp) == len(tid) == len(c)
        assert tid == [[t] for t in c]  # one entry per token: the sampled one
        assert all(len(x) == 1 and x[0] <= 0.0 and math.isfinite(x[0]) for x in lp)
    assert out["finish_reasons"] == ["length"] * 6


def test_literal_trl_payloads(http):
    """The bodies TRL's VLLMClient posts, older and newer releases (fields rlserve ignores included)."""
    older = {"prompts": TEXT_PROMPTS[:2], "images": None, "n": 2, "repetition_penalty": 1.0, "temperature": 0.0,
             "top_p": 1.0, "top_k": -1, "min_p": 0.0, "max_tokens": 4, "truncate_prompt_tokens": None,
             "guided_decoding_regex": None, "generation_kwargs": {}}
    newer = {**older, "structured_outputs_regex": None, "logprobs": 0}
    newer.pop("guided_decoding_regex")
    a, b = generate(http, **older), generate(http, **newer)
    assert a["completion_ids"] == b["completion_ids"] and len(a["completion_ids"]) == 4
    assert [len(x) for x in a["logprobs"]] == [4] * 4  # logprobs=0 is the default
    for x, y in zip(a["logprobs"], b["logprobs"]):  # equal up to float noise (the prefix cache is hit)
        assert [v for (v,) in x] == pytest.approx([v for (v,) in y], abs=1e-4)
    chat = {"messages": CONVERSATIONS, "n": 1, "repetition_penalty": 1.0, "temperature": 0.0, "top_p": 1.0,
            "top_k": -1, "min_p": 0.0, "max_tokens": 3, "logprobs": 0, "structured_outputs_regex": None,
            "generation_kwargs": {}, "chat_template_kwargs": {}, "tools": None}
    out = generate(http, "/chat/", **chat)
    assert len(out["prompt_ids"]) == 2 and len(out["completion_ids"]) == 2


def test_generate_logprobs_n_sorted_with_the_sampled_token_included(http):
    body = dict(prompts=[TOKEN_PROMPTS[1], TOKEN_PROMPTS[2]], n=3, max_tokens=8, temperature=1.0,
                generation_kwargs={"seed": 5})
    base = generate(http, **body, logprobs=0)
    top = generate(http, **body, logprobs=3)
    none = generate(http, **body, logprobs=None)
    # asking for logprobs changes nothing about what is sampled
    assert base["completion_ids"] == top["completion_ids"] == none["completion_ids"]
    assert none["logprobs"] is None and none["logprob_token_ids"] is None
    outside_top = 0
    for c, lps, tids, base_lps in zip(top["completion_ids"], top["logprobs"], top["logprob_token_ids"],
                                      base["logprobs"]):
        assert len(lps) == len(tids) == len(c)
        for token, lp, tid, (sampled_lp,) in zip(c, lps, tids, base_lps):
            assert 3 <= len(tid) <= 4 and len(lp) == len(tid) and len(set(tid)) == len(tid)
            assert lp == sorted(lp, reverse=True)
            assert token in tid and lp[tid.index(token)] == pytest.approx(sampled_lp, abs=1e-5)
            outside_top += len(tid) == 4  # the sampled token was not among the top 3
            assert all(0 <= t < 259 for t in tid)
    assert outside_top > 0  # temperature 1 on a random model: some samples fall outside the top 3


def test_greedy_logprobs_n_put_the_sampled_token_first(http):
    out = generate(http, prompts=TEXT_PROMPTS[:2], max_tokens=8, temperature=0, logprobs=2)
    for c, tids, lps in zip(out["completion_ids"], out["logprob_token_ids"], out["logprobs"]):
        assert [t[0] for t in tids] == c  # greedy: the sampled token is the most likely one
        assert all(len(t) == 2 and lp[0] >= lp[1] for t, lp in zip(tids, lps))


def test_greedy_equals_offline_llm_for_text_and_token_prompts(http, llm):
    for prompts in (TEXT_PROMPTS, TOKEN_PROMPTS):
        out = generate(http, prompts=prompts, max_tokens=16, temperature=0)
        assert out["completion_ids"] == offline(llm, prompts, max_tokens=16, temperature=0)
        assert out["prompt_ids"] == [list(p.encode()) if isinstance(p, str) else p for p in prompts]


def test_n4_grouped_by_prompt_equals_offline_llm(http, llm):
    out = generate(http, prompts=TOKEN_PROMPTS[:3], n=4, max_tokens=8, temperature=0.9, top_p=0.95,
                   generation_kwargs={"seed": 2024})
    want = offline(llm, TOKEN_PROMPTS[:3], n=4, max_tokens=8, temperature=0.9, top_p=0.95, seed=2024)
    assert len(out["completion_ids"]) == 12 and out["completion_ids"] == want
    assert len(out["prompt_ids"]) == 3


def test_chat_equals_offline_llm(http, llm):
    out = generate(http, "/chat/", messages=CONVERSATIONS, max_tokens=10, temperature=0, logprobs=1)
    offline_out = llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=10))
    assert out["prompt_ids"] == [o.prompt_token_ids for o in offline_out]
    assert out["completion_ids"] == [o.outputs[0].token_ids for o in offline_out]
    assert len(out["logprob_token_ids"][0][0]) in (1, 2)
    rendered = bytes(t for t in out["prompt_ids"][0] if t < 256).decode()
    assert rendered.endswith("assistant\n")
    with_kwargs = generate(http, "/chat/", messages=CONVERSATIONS[:1], max_tokens=2, temperature=0, n=2,
                           chat_template_kwargs={"enable_thinking": False},
                           tools=[{"type": "function", "function": {"name": "f"}}])
    assert len(with_kwargs["completion_ids"]) == 2
    assert len(with_kwargs["prompt_ids"][0]) > len(out["prompt_ids"][0])  # the tools went into the prompt


def test_generation_kwargs_override_top_level_fields(http):
    prompt = [TOKEN_PROMPTS[0]]
    greedy = generate(http, prompts=prompt, max_tokens=32, temperature=0)["completion_ids"][0]
    # temperature: top level says sample, generation_kwargs says greedy
    assert generate(http, prompts=prompt, max_tokens=32, temperature=1.0,
                    generation_kwargs={"temperature": 0.0})["completion_ids"][0] == greedy
    # max_tokens
    assert generate(http, prompts=prompt, max_tokens=32, temperature=0,
                    generation_kwargs={"max_tokens": 5})["completion_ids"][0] == greedy[:5]
    # seed: the same seed repeats, another one differs
    seeded = [generate(http, prompts=prompt, max_tokens=16, temperature=1.0,
                       generation_kwargs={"seed": s})["completion_ids"][0] for s in (1, 1, 2)]
    assert seeded[0] == seeded[1] != seeded[2]
    # stop: the first printable ASCII byte after the first token ends the completion (token kept, like vLLM)
    at = next(i for i, t in enumerate(greedy) if i > 0 and 33 <= t < 127)
    stop = chr(greedy[at])
    out = generate(http, prompts=prompt, max_tokens=32, temperature=0, generation_kwargs={"stop": [stop]})
    assert out["completion_ids"][0] == greedy[:at + 1] and out["finish_reasons"] == ["stop"]
    # stop_token_ids
    out = generate(http, prompts=prompt, max_tokens=32, temperature=0,
                   generation_kwargs={"stop_token_ids": [greedy[at]]})
    assert out["completion_ids"][0] == greedy[:at + 1] and out["finish_reasons"] == ["stop"]


def test_generation_kwargs_ignore_eos_and_min_tokens(http, llm):
    prompts = ["eos?", "abc"]
    params = dict(n=8, max_tokens=40, temperature=1.0)
    # a seed with which the random tiny model samples EOS (256 or 258) in some samples, found offline
    seed = next(s for s in (6, 4, 7, 2, 5) if any(
        c.finish_reason == "stop" for o in llm.generate(prompts, SamplingParams(**params, seed=s)) for c in o.outputs))
    natural = generate(http, prompts=prompts, **params, generation_kwargs={"seed": seed})
    assert natural["completion_ids"] == offline(llm, prompts, **params, seed=seed)
    stopped = [c for c, f in zip(natural["completion_ids"], natural["finish_reasons"]) if f == "stop"]
    assert stopped and all(c[-1] in (256, 258) and len(c) < 40 for c in stopped)  # EOS ends some samples
    ignored = generate(http, prompts=prompts, **params, generation_kwargs={"seed": seed, "ignore_eos": True})
    assert all(len(c) == 40 for c in ignored["completion_ids"])
    assert set(ignored["finish_reasons"]) == {"length"}
    at_least = generate(http, prompts=prompts, **params, generation_kwargs={"seed": seed, "min_tokens": 40})
    assert all(len(c) == 40 and not {256, 258} & set(c) for c in at_least["completion_ids"])  # EOS masked


def test_empty_prompts_list_gives_an_empty_result(http):
    """Decision: an empty batch is not an error (TRL's trainer never sends one; vLLM returns [] too)."""
    out = generate(http, prompts=[], max_tokens=4)
    assert out["prompt_ids"] == [] and out["completion_ids"] == []
    assert generate(http, "/chat/", messages=[], max_tokens=4)["completion_ids"] == []
    assert_serves(http)


def test_n_1024_with_the_default_limits_is_served(http):
    """The schema allows n up to 1024; the CPU default runs 256 sequences (before, n > 512 killed the
    replica with "no free block-table row")."""
    out = generate(http, prompts=[[3, 4]], n=1024, max_tokens=2, temperature=1.0,
                   generation_kwargs={"min_tokens": 2})
    assert len(out["completion_ids"]) == 1024 and all(len(c) == 2 for c in out["completion_ids"])
    wait_idle(http)
    assert_serves(http)


# -- bad input: 400 naming the field, then the server still serves ----------------------------------------
BAD_GENERATE = [
    # (body fields, text the message must contain, expected param)
    (dict(prompts=["x" * 70]), "max_model_len", "prompts"),  # the prompt alone is too long
    (dict(prompts=["ok", "x" * 40], max_tokens=30), "max_tokens", "prompts"),  # prompt + max_tokens too long
    (dict(prompts=[[1, 2, 259]]), "prompts[0]", "prompts"),  # the vocabulary is 259 ids: 0..258
    (dict(prompts=[[5], [-1]]), "prompts[1]", "prompts"),
    (dict(prompts=[""]), "prompts[0]", "prompts"),
    (dict(prompts=[[]]), "prompts[0]", "prompts"),
    (dict(prompts=["ok"], temperature=-1), "temperature", "temperature"),
    (dict(prompts=["ok"], top_p=0), "top_p", "top_p"),
    (dict(prompts=["ok"], top_p=1.5), "top_p", "top_p"),
    (dict(prompts=["ok"], top_k=-2), "top_k", "top_k"),
    (dict(prompts=["ok"], n=0), "n must", "n"),
    (dict(prompts=["ok"], max_tokens=0), "max_tokens", "max_tokens"),
    (dict(prompts=["ok"], min_p=2), "min_p", "min_p"),
    (dict(prompts=["ok"], repetition_penalty=0), "repetition_penalty", "repetition_penalty"),
    (dict(prompts=["ok"], logprobs=50), "logprobs", "logprobs"),
    (dict(prompts=["ok"], temperature="hot"), "temperature", "temperature"),
    (dict(prompts=5), "prompts", "prompts"),
    (dict(prompts=[1, 2]), "prompts", "prompts[0]"),
    (dict(prompts=["ok"], n="x"), "n:", "n"),
    (dict(), "prompts", "prompts"),  # missing
    (dict(prompts=["ok"], generation_kwargs={"bogus_key": 1}), "bogus_key", "generation_kwargs"),
    (dict(prompts=["ok"], generation_kwargs={"temperature": -0.5}), "temperature", "temperature"),
    (dict(prompts=["ok"], generation_kwargs={"min_tokens": 20}), "min_tokens", "min_tokens"),
    (dict(prompts=["ok"], generation_kwargs={"seed": "x"}), "seed", "seed"),
    (dict(prompts=["ok"], generation_kwargs={"stop": [""]}), "stop", "stop"),
    (dict(prompts=["ok"], generation_kwargs=[1]), "generation_kwargs", "generation_kwargs"),
]


@pytest.mark.parametrize("body, field, param", BAD_GENERATE, ids=[f"{b}" for b, _, _ in BAD_GENERATE])
def test_bad_generate_input_is_400_naming_the_field(short_http, body, field, param):
    assert_error(short_http.post("/generate/", json=body), 400, field, param)
    assert_serves(short_http)


@pytest.mark.parametrize("body, field", [
    (dict(messages=[{"role": "user", "content": "hi"}]), "messages[0]"),  # one conversation, not a list
    (dict(messages="hi"), "messages"),
    (dict(messages=[[{"role": "user", "content": "x" * 80}]]), "max_model_len"),
    (dict(messages=[CONVERSATIONS[0]], temperature=-1), "temperature"),
    (dict(messages=[CONVERSATIONS[0]], generation_kwargs={"nope": 1}), "generation_kwargs"),
])
def test_bad_chat_input_is_400_naming_the_field(short_http, body, field):
    assert_error(short_http.post("/chat/", json=body), 400, field)
    assert_serves(short_http, "/chat/")


def test_malformed_json_body_is_400(short_http):
    r = short_http.post("/generate/", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400)
    assert_serves(short_http)


def test_a_bad_prompt_queues_nothing_of_its_batch(short_http):
    before = short_http.get("/server_info/").json()["counters"]["prompt_tokens"]
    assert_error(short_http.post("/generate/", json=dict(prompts=["fine", [1, 999]])), 400, "prompts[1]")
    assert short_http.get("/server_info/").json()["counters"]["prompt_tokens"] == before
    assert_serves(short_http)


def test_generation_kwargs_stop_of_wrong_type_names_the_field(short_http):
    assert_error(short_http.post("/generate/", json=dict(prompts=["ok"], generation_kwargs={"stop": 5})),
                 400, "stop", "stop")


def test_generation_kwargs_bool_of_wrong_type_is_400(short_http):
    assert_error(short_http.post("/generate/", json=dict(prompts=["ok"], max_tokens=2,
                                                         generation_kwargs={"ignore_eos": "x"})),
                 400, "ignore_eos", "ignore_eos")


def test_stop_token_ids_outside_the_vocabulary_has_its_own_param(short_http):
    error = assert_error(short_http.post("/generate/", json=dict(
        prompts=["ok"], generation_kwargs={"stop_token_ids": [1000]})), 400, "stop_token_ids")
    assert error["param"] == "stop_token_ids"


# -- concurrency, data parallelism, disconnects ----------------------------------------------------------
def test_32_concurrent_requests_run_in_shared_engine_steps(http, llm):
    prompts = [[(7 * i + j) % 256 for j in range(3 + i % 5)] for i in range(32)]
    want = offline(llm, prompts, max_tokens=12, temperature=0)
    before = replica_stats(http)[0]["num_multi_request_steps"]
    results: list = [None] * 32
    barrier = threading.Barrier(32)

    def one(i):
        with httpx.Client(base_url=str(http.base_url), timeout=120) as c:
            barrier.wait(timeout=30)
            results[i] = c.post("/generate/", json=dict(prompts=[prompts[i]], max_tokens=12, temperature=0))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert all(r is not None and r.status_code == 200 for r in results), [getattr(r, "text", r) for r in results]
    assert [r.json()["completion_ids"][0] for r in results] == want  # batching changes no greedy token
    # One prompt per request: steps with several requests exist only because the engine batched them.
    stats = replica_stats(http)[0]
    assert stats["num_multi_request_steps"] > before
    assert stats["max_running_seqs"] > 1
    metrics = http.get("/metrics").text
    batched = [line for line in metrics.splitlines() if line.startswith("rlserve_batched_steps_total")]
    assert batched and float(batched[0].split()[-1]) > 0


def test_client_disconnect_frees_kv_blocks(server, http):
    counters = http.get("/server_info/").json()["counters"]
    # 6 prompts x 4 samples x 2000 tokens: far longer than the client waits, on any CPU
    body = dict(prompts=[f"long {i}" for i in range(6)], n=4, max_tokens=2000, temperature=1.0,
                generation_kwargs={"ignore_eos": True})
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate/", json=body, timeout=httpx.Timeout(30.0, read=1.5))
    replicas = wait_idle(http, timeout=30)
    assert replicas[0]["kv_blocks_used"] == 0 and replicas[0]["num_running"] == 0
    after = http.get("/server_info/").json()["counters"]
    assert after["requests_aborted"] - counters["requests_aborted"] == 6  # they were running, then aborted
    assert_serves(http)
    # the same with a streamed request (stop strings are checked token by token) on /chat/
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/chat/", json=dict(messages=CONVERSATIONS, n=8, max_tokens=1900,
                                                    generation_kwargs={"ignore_eos": True, "stop": ["\x00\x01"]}),
                   timeout=httpx.Timeout(30.0, read=1.0))
    wait_idle(http, timeout=30)
    assert_serves(http, "/chat/")


def test_aborted_requests_are_counted_once_as_aborted(server, http):
    before = http.get("/server_info/").json()["counters"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/generate/", json=dict(prompts=["a", "b"], n=8, max_tokens=2000,
                                                        generation_kwargs={"ignore_eos": True}),
                   timeout=httpx.Timeout(30.0, read=1.0))
    wait_idle(http, timeout=30)
    after = http.get("/server_info/").json()["counters"]
    assert after["requests_aborted"] - before["requests_aborted"] == 2
    assert after["requests_ok"] == before["requests_ok"]  # not also counted as finished normally
    assert_serves(http)


@pytest.fixture(scope="module")
def dp_http(tiny_model):
    """A server with --data_parallel_size 2 (and the tests' --seed 0: each replica derives its own stream)."""
    with running_server(tiny_model, "--data_parallel_size", "2") as s, \
            httpx.Client(base_url=s.url, timeout=120) as c:
        yield c


def test_data_parallel_2_identical_unseeded_requests_at_once_are_independent(dp_http):
    """The same prompt twice at once lands once on each replica (routing by outstanding tokens). Each replica
    draws request seeds from its own stream, so the unseeded samples differ -- before, every replica's
    generator started from --seed and their first requests came back identical. With a seed, they agree.
    Runs first on this server, while both replicas are at their first draw."""
    body = dict(prompts=[[7, 8, 9]] * 2, max_tokens=16, temperature=1.0, generation_kwargs={"ignore_eos": True})
    before = [r["num_steps"] for r in replica_stats(dp_http)]
    first, second = generate(dp_http, **body)["completion_ids"]
    assert first != second
    assert all(r["num_steps"] > b for r, b in zip(replica_stats(dp_http), before))  # one on each replica
    first, second = generate(dp_http, **dict(body, generation_kwargs={"ignore_eos": True, "seed": 5}))[
        "completion_ids"]
    assert first == second
    wait_idle(dp_http)


def test_data_parallel_2_same_outputs_in_order_on_both_replicas(dp_http, llm):
    prompts = TEXT_PROMPTS + TOKEN_PROMPTS
    want = offline(llm, prompts, max_tokens=10, temperature=0)
    c = dp_http
    assert c.get("/get_world_size/").json() == {"world_size": 2}
    assert c.get("/health/").status_code == 200
    text = generate(c, prompts=TEXT_PROMPTS, max_tokens=10, temperature=0)
    tokens = generate(c, prompts=TOKEN_PROMPTS, max_tokens=10, temperature=0)
    assert text["completion_ids"] + tokens["completion_ids"] == want
    assert text["prompt_ids"] == [list(p.encode()) for p in TEXT_PROMPTS]
    assert tokens["prompt_ids"] == TOKEN_PROMPTS
    sampled = generate(c, prompts=TOKEN_PROMPTS, n=2, max_tokens=6, temperature=1.0,
                       generation_kwargs={"seed": 9})
    assert sampled["completion_ids"] == offline(llm, TOKEN_PROMPTS, n=2, max_tokens=6, temperature=1.0,
                                                seed=9)
    info = c.get("/server_info/").json()
    assert info["data_parallel_size"] == 2 and len(info["replicas"]) == 2
    assert all(r["num_steps"] > 0 for r in info["replicas"]), info["replicas"]
    assert len({r["pid"] for r in info["replicas"]}) == 2
    wait_idle(c)


def test_data_parallel_2_api_process_and_replicas_froze_their_start_up_heap_once(dp_http):
    """Each process moved its start-up heap out of the cyclic collector's reach once ready (a full pass over
    it stopped a replica's decode loop ~100 ms), and reports how many objects that froze and its collector passes
    in /server_info/ and /metrics; requests are served after."""
    def frozen() -> list[int]:
        info = dp_http.get("/server_info/").json()
        return [p["num_gc_frozen_objects"] for p in [info["api_process"], *info["replicas"]]]

    before = frozen()
    assert len(before) == 3 and all(n > 0 for n in before), before
    assert_serves(dp_http)
    after = frozen()
    assert after == before  # counted once, at the freeze (counting walks every frozen object)
    samples = {(s.name, s.labels.get("process"), s.labels.get("generation")): s.value
               for family in text_string_to_metric_families(dp_http.get("/metrics").text) for s in family.samples}
    for process, count in zip(("api", "replica0", "replica1"), after):
        assert samples[("rlserve_gc_frozen_objects", process, None)] == count
        assert ("rlserve_gc_seconds_total", process, "2") in samples
    wait_idle(dp_http)


# -- the command line -------------------------------------------------------------------------------------
TRL_FLAGS = ["model", "revision", "tensor_parallel_size", "data_parallel_size", "host", "port",
             "gpu_memory_utilization", "dtype", "max_model_len", "enable_prefix_caching", "enforce_eager",
             "log_level", "kv_cache_dtype", "trust_remote_code", "vllm_model_impl", "distributed_executor_backend",
             "speculative_config"]  # every field of trl vllm-serve's ScriptArguments, TRL 1.10 and 1.16


def test_serve_help_lists_every_trl_vllm_serve_flag():
    r = subprocess.run([sys.executable, "-m", "rlserve.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in TRL_FLAGS:
        assert f"--{flag} " in r.stdout or f"--{flag}\n" in r.stdout, flag
        if "_" in flag:
            assert f"--{flag.replace('_', '-')}" in r.stdout, flag


def serve_parser() -> argparse.ArgumentParser:
    from rlserve.cli import add_serve_parser
    parser = argparse.ArgumentParser(prog="rlserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.mark.parametrize("sep", ["_", "-"])
def test_serve_accepts_both_flag_spellings(sep):
    values = {"model": "m", "revision": "r1", "tensor_parallel_size": "2", "data_parallel_size": "3",
              "host": "127.0.0.1", "port": "8123", "gpu_memory_utilization": "0.5", "dtype": "bfloat16",
              "max_model_len": "512", "enable_prefix_caching": "false", "enforce_eager": "true",
              "log_level": "debug"}
    argv = ["serve"]
    for name, value in values.items():
        argv += [f"--{name.replace('_', sep)}", value]
    args = serve_parser().parse_args(argv)
    assert (args.model, args.revision, args.tensor_parallel_size, args.data_parallel_size, args.host, args.port,
            args.gpu_memory_utilization, args.dtype, args.max_model_len, args.enable_prefix_caching,
            args.enforce_eager, args.log_level) == \
        ("m", "r1", 2, 3, "127.0.0.1", 8123, 0.5, "bfloat16", 512, False, True, "debug")
    # TRL's boolean style: a bare flag means true
    bare = serve_parser().parse_args(["serve", "--model", "m", f"--enforce{sep}eager"])
    assert bare.enforce_eager is True and bare.enable_prefix_caching is True
    defaults = serve_parser().parse_args(["serve", "--model", "m"])
    assert (defaults.host, defaults.port, defaults.tensor_parallel_size, defaults.data_parallel_size) == \
        ("0.0.0.0", 8000, 1, 1)


def parse_serve(argv: list[str]):
    from rlserve.cli import check_compat_flags
    args = serve_parser().parse_args(argv)
    return args, check_compat_flags(args)


def test_a_trl_vllm_serve_command_line_with_every_flag_starts_rlserve_unchanged():
    args, errors = parse_serve(
        ["serve", "--model", "m", "--kv_cache_dtype", "auto", "--trust_remote_code", "--vllm_model_impl", "vllm",
         "--distributed_executor_backend", "mp", "--log_level", "warning"])
    assert errors == [] and args.trust_remote_code is True and args.log_level == "warning"


def test_the_vllm_serve_command_line_trl_116_builds_starts_rlserve_unchanged():
    """What trl.scripts.vllm_serve.build_command (TRL 1.16) passes to `vllm serve`, with `rlserve` in front."""
    args, errors = parse_serve(
        ["serve", "Qwen/Qwen3-0.6B", "--host", "127.0.0.1", "--port", "8001", "--tensor-parallel-size", "1",
         "--data-parallel-size", "2", "--gpu-memory-utilization", "0.9", "--dtype", "auto", "--kv-cache-dtype",
         "auto", "--model-impl", "vllm", "--uvicorn-log-level", "info", "--max-model-len", "4096",
         "--no-enable-prefix-caching", "--enforce-eager", "--trust-remote-code", "--enable-scale-out",
         "--weight-transfer-config", '{"backend": "nccl"}', "--logprobs-mode", "processed_logprobs",
         "--max-logprobs", "-1"])
    assert errors == []
    assert (args.model, args.port, args.data_parallel_size, args.max_model_len, args.enable_prefix_caching,
            args.enforce_eager, args.max_logprobs) == ("Qwen/Qwen3-0.6B", 8001, 2, 4096, False, True, -1)


@pytest.mark.parametrize("argv, names", [
    (["--kv_cache_dtype", "fp8"], "--kv_cache_dtype fp8"),
    (["--speculative_config", '{"method": "ngram"}'], "--speculative_config"),
    (["--weight-transfer-config", '{"backend": "ipc"}'], "'ipc'"),
    (["--weight-transfer-config", "nccl"], "--weight_transfer_config must be a JSON object"),
    (["--max_logprobs", "-2"], "--max_logprobs"),
])
def test_compat_flags_rlserve_cannot_honour_are_refused_naming_the_flag(argv, names):
    _, errors = parse_serve(["serve", "--model", "m", *argv])
    assert len(errors) == 1 and names in errors[0], errors
    _, errors = parse_serve(["serve", "--model", "m"])  # and the same command without it is fine
    assert errors == []


def test_max_logprobs_minus_one_lifts_the_cap_as_trl_116_asks_vllm_to(tiny_model, http):
    body = dict(prompts=[TOKEN_PROMPTS[1]], max_tokens=3, temperature=1.0, logprobs=40)
    r = http.post("/generate/", json=body)  # the module's server: vLLM's default cap of 20
    assert r.status_code == 400 and "--max_logprobs" in r.text and r.json()["error"]["param"] == "logprobs"
    with running_server(tiny_model, "--max-logprobs", "-1") as s, httpx.Client(base_url=s.url, timeout=120) as c:
        out = c.post("/generate/", json=body)
        assert out.status_code == 200, out.text
        assert all(len(token) == 40 for token in out.json()["logprobs"][0])
    assert http.post("/generate/", json=dict(body, logprobs=2)).status_code == 200


def test_serve_without_a_model_exits_2_naming_it():
    r = subprocess.run([sys.executable, "-m", "rlserve.cli", "serve", "--kv_cache_dtype", "fp8"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "the model is required" in r.stderr and "--kv_cache_dtype fp8" in r.stderr


# -- the binary response layout ----------------------------------------------------------------------------
@pytest.mark.parametrize("logprobs", [0, 2, None])
def test_binary_response_decodes_to_exactly_the_json_response(http, logprobs):
    """Same seeded request twice, each on a cold prefix cache (a hit may change logprobs in the last bits):
    the binary answer decodes to the JSON answer, ids equal and logprobs bit-equal; then a normal request."""
    from rlserve.server import binary
    body = dict(prompts=[TOKEN_PROMPTS[1], TOKEN_PROMPTS[2], TOKEN_PROMPTS[3]], n=3, max_tokens=7,
                temperature=1.0, logprobs=logprobs, generation_kwargs={"seed": 3})
    for path, prompt_field in (("/generate/", None), ("/chat/", "messages")):
        if prompt_field:
            body = dict(body, messages=CONVERSATIONS)
            body.pop("prompts")
        http.post("/reset_prefix_cache/").raise_for_status()
        as_json = generate(http, path, **body)
        http.post("/reset_prefix_cache/").raise_for_status()
        answer = generate(http, path, **body, response_format="binary")
        assert answer["format"] == binary.FORMAT and "completion_ids" not in answer
        decoded = binary.decode(answer)
        assert decoded == as_json
        if logprobs is not None:  # == on floats is bit equality here (no NaN); check the types too
            assert all(type(v) is float for row in decoded["logprobs"] for entries in row for v in entries)
            assert answer["logprobs_dtype"] == "float32"
        assert_serves(http, path)


def test_binary_response_of_an_unknown_format_is_400(http):
    r = http.post("/generate/", json={"prompts": ["ok"], "max_tokens": 2, "response_format": "msgpack"})
    assert_error(r, 400, "response_format")
    assert_serves(http)


def test_fused_kernels_switch_is_decided_at_the_edge_and_carried_by_the_config(monkeypatch, llm):
    """--fused_kernels (default: on unless $RLSERVE_FUSED=0) goes into EngineConfig; the runner applies it once,
    and on a CPU never turns the kernels on."""
    from rlserve.server.launcher import engine_config_from_args
    monkeypatch.delenv("RLSERVE_FUSED", raising=False)
    assert engine_config_from_args(serve_parser().parse_args(["serve", "--model", "m"])).fused_kernels is True
    off = serve_parser().parse_args(["serve", "--model", "m", "--fused-kernels", "false"])
    assert engine_config_from_args(off).fused_kernels is False
    monkeypatch.setenv("RLSERVE_FUSED", "0")
    assert engine_config_from_args(serve_parser().parse_args(["serve", "--model", "m"])).fused_kernels is False
    assert llm.config.fused_kernels is True and llm.engine.runner.use_fused_kernels is False  # CPU
    assert not any(getattr(m, "use_fused", False) for m in llm.engine.model.modules())



def test_shared_prefix_threshold_flag_reaches_the_config():
    from rlserve.config import EngineConfig
    from rlserve.server.launcher import engine_config_from_args
    assert engine_config_from_args(serve_parser().parse_args(["serve", "--model", "m"])).shared_prefix_min_tokens \
        == EngineConfig.shared_prefix_min_tokens == 1024
    off = serve_parser().parse_args(["serve", "--model", "m", "--shared-prefix-min-tokens", "0"])
    assert engine_config_from_args(off).shared_prefix_min_tokens == 0
    with pytest.raises(ValueError, match="shared_prefix_min_tokens must be >= 0"):
        engine_config_from_args(serve_parser().parse_args(["serve", "--model", "m", "--shared_prefix_min_tokens",
                                                           "-5"]))

# -- rlserve.Client ---------------------------------------------------------------------------------------
def test_client_trl_methods(server, llm):
    with Client(base_url=server.url, connection_timeout=10) as client:
        client.check_server(5)
        assert client.get_world_size() == 1
        client.reset_prefix_cache()
        out = client.generate(TEXT_PROMPTS[:2], n=2, max_tokens=5, temperature=0)
        assert len(out["prompt_ids"]) == 2 and len(out["completion_ids"]) == 4
        want = offline(llm, TEXT_PROMPTS[:2], max_tokens=5, temperature=0)
        assert out["completion_ids"] == [want[0], want[0], want[1], want[1]]
        assert [len(x) for x in out["logprobs"][0]] == [1] * 5  # logprobs=0 by default, as in TRL
        top = client.generate([TOKEN_PROMPTS[0]], max_tokens=3, temperature=0, logprobs=2,
                              generation_kwargs={"seed": 1})
        assert all(len(t) == 2 for t in top["logprob_token_ids"][0])
        assert client.generate([[1, 2]], max_tokens=2, logprobs=None)["logprobs"] is None
        chat = client.chat(CONVERSATIONS, max_tokens=4, temperature=0)
        assert chat["completion_ids"] == [o.outputs[0].token_ids
                                          for o in llm.chat(CONVERSATIONS, SamplingParams(temperature=0,
                                                                                          max_tokens=4))]
        assert client.chat(CONVERSATIONS, max_tokens=4, temperature=0, binary_response=True) == chat
        chat_arrays = client.chat(CONVERSATIONS, max_tokens=4, temperature=0, logprobs=2, as_arrays=True)
        assert [a.tolist() for a in chat_arrays["completion_ids"]] == chat["completion_ids"]
        assert {a.shape for a in chat_arrays["logprobs"]} == {(4, 3)}
        with pytest.raises(ServerError) as e:
            client.generate(["ok"], temperature=-1)
        assert e.value.status == 400 and "temperature" in e.value.message
        assert len(client.generate(["ok"], max_tokens=2)["completion_ids"]) == 1
        for logprobs in (0, 3, None):  # binary_response: the same dict as JSON
            kwargs = dict(n=2, max_tokens=6, temperature=1.0, logprobs=logprobs, generation_kwargs={"seed": 4})
            client.reset_prefix_cache()
            as_json = client.generate(TOKEN_PROMPTS[:3], **kwargs)
            client.reset_prefix_cache()
            assert client.generate(TOKEN_PROMPTS[:3], **kwargs, binary_response=True) == as_json
            client.reset_prefix_cache()  # as_arrays: the same values, an array per sequence
            arrays = client.generate(TOKEN_PROMPTS[:3], **kwargs, as_arrays=True)
            assert [a.tolist() for a in arrays["completion_ids"]] == as_json["completion_ids"]
            if logprobs is None:
                assert arrays["logprobs"] is None
                continue
            for key in ("logprobs", "logprob_token_ids"):  # logprob_token_ids >= 0: the real entries
                got = [[row[ids >= 0].tolist() for row, ids in zip(a, id_rows)]
                       for a, id_rows in zip(arrays[key], arrays["logprob_token_ids"])]
                assert got == as_json[key]
            assert {a.shape[1] for a in arrays["logprobs"]} == {max(logprobs, 1) + (logprobs > 0)}
            for sampled, values, ids, tokens in zip(arrays["sampled_logprobs"], arrays["logprobs"],
                                                    arrays["logprob_token_ids"], arrays["completion_ids"]):
                assert sampled.tolist() == [float(v[i == t][0]) for v, i, t in zip(values, ids, tokens)]
        # Greedy: the sampled token is always among the top N, so no row has N + 1 entries; the arrays keep the
        # width N + 1 all the same -- also when generation_kwargs asks for the N (the server lets them win).
        for kwargs in (dict(logprobs=3), dict(logprobs=0, generation_kwargs={"logprobs": 3})):
            greedy = client.generate(TOKEN_PROMPTS[:3], max_tokens=5, temperature=0.0, as_arrays=True, **kwargs)
            assert {a.shape for a in greedy["logprobs"]} == {(5, 4)}
            assert all((ids[:, 3] == -1).all() and (ids[:, :3] >= 0).all() for ids in greedy["logprob_token_ids"])
            assert all(np.array_equal(s, v[:, 0]) for s, v in zip(greedy["sampled_logprobs"], greedy["logprobs"]))
    # TRL's constructor style: host and server_port
    with Client(host="127.0.0.1", server_port=server.port) as client:
        assert client.get_world_size() == 1


def test_client_check_server_against_a_dead_port_raises_connection_error():
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        Client(base_url=f"http://127.0.0.1:{free_port()}", connection_timeout=1.0)
    assert time.monotonic() - start < 1.0 + 1.0


def test_client_check_server_gives_up_within_the_timeout():
    start = time.monotonic()
    with pytest.raises(ConnectionError):
        Client(base_url=f"http://127.0.0.1:{free_port()}", connection_timeout=2.0)
    assert time.monotonic() - start < 2.0 + 0.5
