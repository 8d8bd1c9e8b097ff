"""A bounded fuzz of a real server: randomized valid and invalid requests from a seeded RNG -- n far beyond
max_num_seqs, long and short prompts, penalties, truncation, logprobs, guided outputs, stop strings and stop
ids, client disconnects and timeouts, /pause/ and /resume/, /abort/ mid-flight, the OpenAI route -- sent by a
few threads at once for a bounded time. Every valid request is served (200, the right shapes) and every
invalid one is a 400 naming the field; afterwards the server serves a normal request and holds no KV block.

The server is small on purpose (8 sequences, a 24-token step budget, 96 KV blocks of 4 tokens, contexts of
128): large n runs in parts, prompts are chunked, one-token chunks run among decodes, blocks run out and
sequences are preempted. ``RLSERVE_FUZZ_SEED`` and ``RLSERVE_FUZZ_SECONDS`` replay or lengthen a run.
"""

from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from server_utils import running_server

SEED = int(os.environ.get("RLSERVE_FUZZ_SEED", "14"))
DURATION_S = float(os.environ.get("RLSERVE_FUZZ_SECONDS", "30"))
MAX_ACTIONS = 400
NUM_THREADS = 4
MAX_MODEL_LEN = 128
SERVER_ARGS = ("--max_num_seqs", "8", "--max_num_batched_tokens", "24", "--num_kv_blocks", "96",
               "--block_size", "4", "--max_model_len", str(MAX_MODEL_LEN))
VOCAB = 259  # the tiny models' byte tokenizer: 256 bytes + 3 specials


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model, *SERVER_ARGS) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def assert_serves_and_idle(http, timeout: float = 60.0) -> None:
    """A normal request succeeds, then no sequence runs or waits and every KV block is free."""
    r = http.post("/generate/", json=dict(prompts=["ok"], max_tokens=4, temperature=0))
    assert r.status_code == 200, r.text
    assert http.get("/health/").status_code == 200
    deadline = time.monotonic() + timeout
    while True:
        s = http.get("/server_info/").json()["replicas"][0]
        if s["num_running"] == s["num_waiting"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"]:
            return
        assert time.monotonic() < deadline, f"not idle after {timeout}s: {s}"
        time.sleep(0.1)


# -- named cases ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [200, 1024])
def test_n_far_beyond_max_num_seqs_is_served(server, http, n):
    """n = 200 and the schema's limit 1024 on a server that runs 8 sequences (before: "no free block-table
    row" killed the replica and every later request got 503)."""
    body = dict(prompts=[[1, 2, 3]], n=n, max_tokens=3, temperature=1.0, logprobs=0,
                generation_kwargs={"min_tokens": 3})
    r = http.post("/generate/", json=body, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["completion_ids"]) == n and all(len(c) == 3 for c in out["completion_ids"])
    assert len(set(map(tuple, out["completion_ids"]))) > 1  # independent samples
    assert_serves_and_idle(http)


@pytest.mark.parametrize("body, field", [
    (dict(n=1025), "n must be <= 1024"),
    (dict(max_tokens=MAX_MODEL_LEN), "max_model_len"),
    (dict(prompts=[[1] * MAX_MODEL_LEN]), "max_model_len"),
    (dict(logprobs=21), "logprobs must be <= 20"),
    (dict(temperature=1e39), "temperature"),
    (dict(repetition_penalty=1e300), "repetition_penalty"),
    (dict(generation_kwargs={"min_tokens": 5}, max_tokens=4), "min_tokens must be <= 4"),
    (dict(generation_kwargs={"stop_token_ids": [VOCAB]}), "stop_token_ids"),
    (dict(generation_kwargs={"structured_outputs": {"regex": "("}}), "structured_outputs"),
])
def test_every_schema_limit_is_a_400_naming_the_field_and_the_limit(server, http, body, field):
    r = http.post("/generate/", json={"prompts": [[1, 2, 3]], **body})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert_serves_and_idle(http)


# -- the fuzz -------------------------------------------------------------------------------------------
def random_prompt(rng: random.Random, text: bool):
    if text:
        return "".join(rng.choice("abc xyz!") for _ in range(rng.randrange(1, 30)))
    length = rng.choice([1, 2, 3, rng.randrange(1, 20), rng.randrange(20, 90)])
    return [rng.randrange(0, 256) for _ in range(length)]


def random_valid(rng: random.Random) -> dict:
    max_tokens = rng.choice([1, 2, 5, rng.randrange(1, 30)])
    kwargs: dict = {}
    text = rng.random() < 0.3  # one request's prompts are all texts or all token ids
    body = dict(prompts=[random_prompt(rng, text) for _ in range(rng.choice([1, 1, 2, 3]))],
                n=rng.choice([1, 1, 2, 3, 8, 20, 40]), max_tokens=max_tokens,
                temperature=rng.choice([0.0, 0.5, 1.0, 1.3]), logprobs=rng.choice([None, 0, 0, 1, 5, 20]),
                generation_kwargs=kwargs)
    if rng.random() < 0.3:
        body["top_p"] = rng.choice([0.1, 0.5, 0.9])
    if rng.random() < 0.2:
        body["top_k"] = rng.choice([1, 5, 50, 1000])
    if rng.random() < 0.2:
        body["min_p"] = rng.choice([0.05, 0.3, 1.0])
    if rng.random() < 0.25:
        body["repetition_penalty"] = rng.choice([0.8, 1.2, 2.0])
    if rng.random() < 0.2:
        kwargs.update(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2))
    if rng.random() < 0.3:
        kwargs["seed"] = rng.randrange(-2**63, 2**63)
    if rng.random() < 0.3:
        kwargs["min_tokens"] = rng.randrange(0, max_tokens + 1)
    if rng.random() < 0.2:
        kwargs["ignore_eos"] = True
    if rng.random() < 0.2:
        kwargs["stop"] = [rng.choice("abcdefgh !") * rng.randrange(1, 3) for _ in range(rng.randrange(1, 3))]
    if rng.random() < 0.15:
        kwargs["stop_token_ids"] = [rng.randrange(0, VOCAB) for _ in range(2)]
    if rng.random() < 0.1:
        kwargs["logprobs_mode"] = "raw"
    if rng.random() < 0.2:
        kwargs["structured_outputs"] = rng.choice([{"regex": "[a-c]{1,6}"}, {"choice": ["yes", "no", "maybe"]},
                                                   {"regex": ""}, {"regex": "x+y?"}])
    return body


# (field, bad value, text the 400 must contain)
INVALID = [("n", 0, "n"), ("n", 5000, "n"), ("temperature", -1, "temperature"), ("top_p", 0, "top_p"),
           ("top_k", -3, "top_k"), ("min_p", 2, "min_p"), ("max_tokens", 0, "max_tokens"),
           ("max_tokens", 10**9, "max_tokens"), ("logprobs", 50, "logprobs"), ("prompts", [[1, VOCAB]], "prompts"),
           ("prompts", [[5] * 200], "max_model_len"), ("prompts", [[]], "prompts"), ("prompts", 7, "prompts"),
           ("repetition_penalty", 0, "repetition_penalty"), ("temperature", "hot", "temperature"),
           ("generation_kwargs", {"bogus": 1}, "bogus"), ("generation_kwargs", {"seed": 1.5}, "seed"),
           ("generation_kwargs", {"stop": [""]}, "stop"), ("generation_kwargs", {"presence_penalty": 9}, "presence"),
           ("generation_kwargs", {"stop_token_ids": [-1]}, "stop_token_ids"),
           ("generation_kwargs", {"structured_outputs": {"regex": "(("}}, "structured_outputs"),
           ("generation_kwargs", {"structured_outputs": {"choice": "x", "regex": "y"}}, "structured_outputs")]


def check_valid_response(body: dict, r: httpx.Response) -> None:
    assert r.status_code == 200, (body, r.text)
    out = r.json()
    n, num_prompts = body["n"], len(body["prompts"])
    assert len(out["completion_ids"]) == n * num_prompts and len(out["prompt_ids"]) == num_prompts
    for ids, reason in zip(out["completion_ids"], out["finish_reasons"]):
        assert reason in ("stop", "length", "abort"), (body, reason)
        assert len(ids) <= body["max_tokens"] and all(0 <= t < VOCAB for t in ids), (body, ids)
        if reason == "length":
            assert len(ids) == body["max_tokens"]
    if body.get("logprobs", 0) is not None:  # TRL's default is 0
        for ids, lps in zip(out["completion_ids"], out["logprobs"]):
            assert len(lps) == len(ids)


class Fuzzer:
    def __init__(self, url: str, seed: int, deadline: float):
        self.url, self.deadline = url, deadline
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.num_actions = 0
        self.counts: dict[str, int] = {}

    def next_action(self) -> tuple[str, random.Random] | None:
        with self.lock:  # one seeded stream of choices, handed out in order
            if time.monotonic() > self.deadline or self.num_actions >= MAX_ACTIONS:
                return None
            self.num_actions += 1
            kind = self.rng.choices(["valid", "invalid", "openai", "disconnect", "abort", "pause"],
                                    weights=[10, 4, 2, 2, 1, 1])[0]
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return kind, random.Random(self.rng.getrandbits(64))

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as http:
            while (action := self.next_action()) is not None:
                kind, rng = action
                getattr(self, kind)(http, rng)

    def valid(self, http, rng):
        body = random_valid(rng)
        check_valid_response(body, http.post("/generate/", json=body))

    def invalid(self, http, rng):
        body = random_valid(rng)
        field, value, text = rng.choice(INVALID)
        if field == "generation_kwargs":
            body["generation_kwargs"] = dict(body["generation_kwargs"], **value)
            body["generation_kwargs"].pop("min_tokens", None)
        else:
            body[field] = value
        r = http.post("/generate/", json=body)
        assert r.status_code == 400 and text in r.json()["error"]["message"], (body, r.text)

    def openai(self, http, rng):
        n, max_tokens = rng.choice([1, 2, 12]), rng.randrange(1, 12)
        body = dict(prompt=random_prompt(rng, rng.random() < 0.5), n=n, max_tokens=max_tokens, temperature=rng.choice([0, 1.0]),
                    logprobs=rng.choice([None, 0, 3]), return_token_ids=True, seed=rng.choice([None, 7]))
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200, (body, r.text)
        assert len(r.json()["choices"]) == n

    def disconnect(self, http, rng):
        """A client that gives up mid-request (its requests are aborted and freed server-side)."""
        body = random_valid(rng)
        body.update(max_tokens=60, generation_kwargs={"ignore_eos": True})
        body["prompts"] = [p if isinstance(p, list) else [1, 2] for p in body["prompts"]]
        body["prompts"] = [p[:MAX_MODEL_LEN - 61] for p in body["prompts"]]
        try:
            r = httpx.post(self.url + "/generate/", json=body, timeout=rng.uniform(0.05, 0.5))
            check_valid_response(body, r)  # it finished in time
        except httpx.TimeoutException:
            pass

    def abort(self, http, rng):
        request_id = f"fuzz-{rng.getrandbits(32):08x}"
        body = dict(prompts=[[rng.randrange(256) for _ in range(5)]], n=rng.choice([1, 4, 20]), max_tokens=80,
                    generation_kwargs={"ignore_eos": True})
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(http.post, "/generate/", json=body, headers={"X-Request-Id": request_id})
            time.sleep(rng.uniform(0.0, 0.3))
            assert http.post("/abort/", json={"request_ids": [request_id]}).status_code == 200
            r = running.result(60)
        check_valid_response(body, r)

    def pause(self, http, rng):
        mode = rng.choice(["abort", "keep", "wait"])
        with ThreadPoolExecutor(1) as pool:
            pausing = pool.submit(http.post, "/pause/", json={"mode": mode})
            time.sleep(rng.uniform(0.0, 0.3))
            try:
                assert pausing.result(60).status_code == 200
            finally:
                assert http.post("/resume/").status_code == 200


FAST_RL_FLAGS = ("--async_scheduling", "--num_scheduler_steps", "4")  # overlap and multi-step decoding


@pytest.mark.parametrize("flags", [(), FAST_RL_FLAGS], ids=["default", "async-multistep"])
def test_fuzz_valid_and_invalid_requests_then_a_normal_request_and_no_kv_blocks_held(tiny_model, server, http, flags):
    """The same fuzz against the default engine and against one with async scheduling and multi-step decoding (a
    server of its own, half the time)."""
    if flags:
        with running_server(tiny_model, *SERVER_ARGS, *flags) as other, \
                httpx.Client(base_url=other.url, timeout=60) as other_http:
            run_fuzz(other, other_http, DURATION_S / 2)
            assert other_http.get("/server_info/").json()["replicas"][0]["num_multi_step_launches"] > 0
    else:
        run_fuzz(server, http, DURATION_S)


def run_fuzz(server, http, duration_s: float) -> None:
    fuzzer = Fuzzer(server.url, SEED, time.monotonic() + duration_s)
    try:
        with ThreadPoolExecutor(NUM_THREADS) as pool:
            for f in [pool.submit(fuzzer.run) for _ in range(NUM_THREADS)]:
                f.result(duration_s + 180)
    finally:
        http.post("/resume/")  # whatever happened, leave the server running
    print(f"fuzz: seed {SEED}, {fuzzer.num_actions} actions {fuzzer.counts}")
    assert fuzzer.num_actions >= 20 and fuzzer.counts.get("valid", 0) >= 5, fuzzer.counts
    assert server.proc.poll() is None
    assert_serves_and_idle(http)
    counters = http.get("/server_info/").json()["counters"]
    assert counters["requests_failed"] == 0, counters  # no valid request failed in the engine
