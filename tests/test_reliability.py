"""Reliability of a real ``rlserve serve`` process: pause modes and aborts, overload and recovery, engine
failures (a forward that raises, a killed engine process, a killed API server), SIGTERM draining, Prometheus
metrics, the load generator, weight-sync faults repeated, and an RL soak (generate -> weight update, 300
rounds) with flat memory and file descriptors.

One module server (model A, a small KV cache) carries the tests that leave it serving; each test leaves it
idle, unpaused and holding model A's weights. Tests that end a server start their own. Every wait has a
timeout, every negative test is followed by a request that must succeed, and no process outlives its test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file

from rlserve import Client
from rlserve.client.client import ServerError
from rlserve.models.tiny import make_tiny_model
from server_utils import ServerProcess, free_port

PROMPTS = [[1, 2, 3], list(range(40, 60))]  # the second fills a KV block: the prefix cache sees it
GROUP_TIMEOUT_S = 5.0  # weight-sync group timeout: a dead trainer is noticed within this
LONG = dict(prompts=[[5, 6, 7]], max_tokens=1500, generation_kwargs={"ignore_eos": True})


# -- fixtures -------------------------------------------------------------------------------------------
STARTED: list[psutil.Process] = []  # every server process and child this module started


def tree(server: ServerProcess) -> list[psutil.Process]:
    return [psutil.Process(server.proc.pid)] + server.children()


def start_server(model: str, *args: str, **kwargs) -> ServerProcess:
    server = ServerProcess(model, *args, **kwargs)
    STARTED.extend(tree(server))  # recorded now: an orphan leaves our process tree, not this list
    return server


@pytest.fixture(scope="module", autouse=True)
def no_orphans():
    """Set up first, torn down last: every process this module started is gone at the end."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    yield
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    _, alive = psutil.wait_procs(STARTED + new, timeout=15)
    assert not alive, f"processes left behind: {[p.pid for p in alive]}"


@pytest.fixture(scope="module")
def model_b(tmp_path_factory) -> str:
    """The trainer's other model: the server's architecture and shapes, another seed."""
    return str(make_tiny_model(tmp_path_factory.mktemp("reliability") / "b", "qwen2", seed=123))


@pytest.fixture(scope="module")
def weights(tiny_model, model_b) -> dict[str, dict[str, torch.Tensor]]:
    """Hugging Face-named tensors of model "A" (what the server loads) and model "B"."""
    return {"A": load_file(os.path.join(tiny_model, "model.safetensors")),
            "B": load_file(os.path.join(model_b, "model.safetensors"))}


@pytest.fixture(scope="module")
def server(tiny_model):
    # 512 blocks x 16 = 8192 tokens of KV: 200 long requests overload it (most of them wait).
    s = start_server(tiny_model, "--num_kv_blocks", "512")
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


class Trainer:
    """The trainer side of weight sync: pushes model A's or B's weights into the module server."""

    def __init__(self, url: str, weights: dict):
        self.url, self.weights = url, weights
        self.client: Client | None = None

    def connect(self) -> Client:
        """A new group on a new port, without closing the old one (as a restarted trainer does)."""
        if self.client is not None:
            self.client.communicator = None  # dropped, not closed
            self.client.http.close()
        self.client = Client(base_url=self.url, group_port=free_port())
        self.client.init_communicator(device="cpu", timeout_s=GROUP_TIMEOUT_S)
        return self.client

    def push(self, which: str) -> int:
        return self.client.update_weights(self.weights[which].items())


@pytest.fixture(scope="module")
def trainer(server, weights):
    t = Trainer(server.url, weights)
    t.connect()
    yield t
    if t.client is not None:
        t.client.close()


def greedy(http) -> dict:
    r = http.post("/generate/", json=dict(prompts=PROMPTS, max_tokens=8, temperature=0,
                                          generation_kwargs={"min_tokens": 8}))
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def expected(http, trainer) -> dict[str, list[list[int]]]:
    """Greedy outputs of PROMPTS under model A and model B; the server holds A again afterwards."""
    out = {"A": greedy(http)["completion_ids"]}
    trainer.push("B")
    out["B"] = greedy(http)["completion_ids"]
    trainer.push("A")
    assert greedy(http)["completion_ids"] == out["A"]  # the same weights, pushed, give the same tokens
    assert out["A"] != out["B"]
    return out


# -- helpers ------------------------------------------------------------------------------------------
def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def stats(http) -> dict:
    return http.get("/server_info/").json()["replicas"][0]


def wait_stats(http, predicate, timeout: float, what: str) -> dict:
    """Poll the replica's stats until ``predicate(stats)``; returns those stats."""
    def check():
        s = stats(http)
        return s if predicate(s) else None
    return wait_until(check, timeout, what)


def wait_idle(http, timeout: float = 30.0) -> dict:
    """Until no sequence runs or waits and no KV block is in use; then free == total."""
    s = wait_stats(http, lambda s: s["num_running"] == s["num_waiting"] == s["kv_blocks_used"] == 0, timeout,
                   "the server to go idle")
    assert s["kv_blocks_free"] == s["kv_blocks_total"], s
    return s


def assert_serves(http) -> None:
    r = http.post("/generate/", json=dict(prompts=["ok"], max_tokens=2, temperature=0))
    assert r.status_code == 200, r.text
    assert len(r.json()["completion_ids"][0]) in (1, 2)


def post(url: str, body: dict, timeout: float = 120.0, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/generate/", json=body, timeout=timeout, headers=headers)


def wait_running(http, num_steps_after: int | None = None, count: int = 1, timeout: float = 30.0) -> dict:
    """Until ``count`` sequences run (and, if given, the engine made more than ``num_steps_after`` steps)."""
    return wait_stats(http, lambda s: s["num_running"] >= count and (
        num_steps_after is None or s["num_steps"] > num_steps_after), timeout, f"{count} running sequence(s)")


def error_of(r: httpx.Response) -> str:
    return r.json()["error"]["message"]


def assert_exits(server: ServerProcess, children: list[psutil.Process], code: int, timeout: float = 60.0):
    """The server exits with ``code`` and leaves no child behind."""
    try:
        assert server.proc.wait(timeout) == code
    except subprocess.TimeoutExpired:
        pytest.fail(f"server still running {timeout}s later")
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, f"orphaned children: {[p.pid for p in alive]}"


# -- pause, resume, abort -------------------------------------------------------------------------------
def test_pause_abort_ends_in_flight_requests_with_their_partial_output(server, http):
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(post, server.url, LONG)
        wait_running(http, stats(http)["num_steps"] + 2)
        try:
            r = http.post("/pause/", json={"mode": "abort"})
            assert r.status_code == 200, r.text
            out = running.result(30)
            assert out.status_code == 200, out.text
            assert out.json()["finish_reasons"] == ["abort"]
            assert 0 < len(out.json()["completion_ids"][0]) < LONG["max_tokens"]
            # Paused: a new request waits, then runs after /resume/.
            waiting = pool.submit(post, server.url, dict(prompts=["x"], max_tokens=4, temperature=0))
            queued = wait_stats(http, lambda s: s["num_waiting"] == 1, 10, "the new request to queue")
            time.sleep(0.3)
            assert not waiting.done() and stats(http)["num_steps"] == queued["num_steps"]
        finally:
            assert http.post("/resume/").status_code == 200
        assert waiting.result(30).status_code == 200
    wait_idle(http)
    assert_serves(http)


def test_pause_wait_drains_then_pauses(server, http):
    body = dict(prompts=[[9, 8, 7]], max_tokens=300, generation_kwargs={"ignore_eos": True})
    ok_before = http.get("/server_info/").json()["counters"]["requests_ok"]
    with ThreadPoolExecutor(3) as pool:
        running = pool.submit(post, server.url, body)
        wait_running(http)
        try:
            pausing = pool.submit(http.post, "/pause/", json={"mode": "wait"})
            assert pausing.result(60).status_code == 200
            # The pause answered once the request had finished (counted when its output came back).
            assert http.get("/server_info/").json()["counters"]["requests_ok"] == ok_before + 1
            out = running.result(30)
            assert out.status_code == 200 and out.json()["finish_reasons"] == ["length"]
            assert len(out.json()["completion_ids"][0]) == 300  # finished, not cut
            assert stats(http)["paused"] == "keep"
            waiting = pool.submit(post, server.url, dict(prompts=["x"], max_tokens=4, temperature=0))
            time.sleep(0.3)
            assert not waiting.done()
        finally:
            assert http.post("/resume/").status_code == 200
        assert waiting.result(30).status_code == 200
    wait_idle(http)
    assert_serves(http)


def test_pause_keep_freezes_requests_and_a_weight_update_continues_them_with_new_weights(
        server, http, trainer, expected):
    body = dict(prompts=[[11, 12, 13, 14]], max_tokens=400, temperature=0, generation_kwargs={"ignore_eos": True})
    under_a = post(server.url, body).json()["completion_ids"][0]
    version_a = http.get("/server_info/").json()["weight_version"]
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server.url, body)
        wait_running(http, stats(http)["num_steps"] + 3)  # a few tokens made under A
        try:
            assert http.post("/pause/", json={"mode": "keep"}).status_code == 200
            frozen = stats(http)
            time.sleep(0.4)
            still = stats(http)
            assert still["num_steps"] == frozen["num_steps"] and still["num_running"] == 1
            assert still["kv_blocks_used"] > 0 and not running.done()  # kept, KV cache and all
            version_b = trainer.push("B")  # loaded while the request is frozen
        finally:
            assert http.post("/resume/").status_code == 200
        out = running.result(60)
    assert out.status_code == 200, out.text
    result = out.json()
    assert result["finish_reasons"] == ["length"] and len(result["completion_ids"][0]) == 400
    assert result["weight_versions"] == [[version_a, version_b]]  # both versions, in order
    assert result["weight_version"] == version_b
    tokens = result["completion_ids"][0]
    assert tokens[:3] == under_a[:3] and tokens != under_a  # began under A, went on under B
    assert greedy(http)["completion_ids"] == expected["B"]
    trainer.push("A")
    assert greedy(http)["completion_ids"] == expected["A"]
    wait_idle(http)


def test_abort_all(server, http):
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, server.url, LONG) for _ in range(2)]
        wait_running(http, count=2)
        r = http.post("/abort/", json={})
        assert r.status_code == 200 and len(r.json()["aborted"]) == 2, r.text
        for f in futures:
            out = f.result(30)
            assert out.status_code == 200 and out.json()["finish_reasons"] == ["abort"]
            assert len(out.json()["completion_ids"][0]) < LONG["max_tokens"]
    wait_idle(http)
    assert_serves(http)


def test_abort_by_request_id_from_the_x_request_id_header(server, http):
    two = dict(LONG, prompts=[[5, 6, 7], [8, 9]])
    other = dict(prompts=[[1, 2]], max_tokens=200, generation_kwargs={"ignore_eos": True})
    with ThreadPoolExecutor(3) as pool:
        try:
            target = pool.submit(post, server.url, two, 120, {"X-Request-Id": "job-a"})
            wait_running(http, count=2)
            bystander = pool.submit(post, server.url, other, 120, {"X-Request-Id": "job-ab"})
            wait_running(http, count=3)
            r = http.post("/abort/", json={"request_ids": ["job-a"]})
            assert r.status_code == 200 and sorted(r.json()["aborted"]) == ["job-a-0", "job-a-1"], r.text
            duplicate = post(server.url, dict(prompts=["x"], max_tokens=2), headers={"X-Request-Id": "job-ab"})
            assert duplicate.status_code == 409, duplicate.text  # the ids of running requests are unique
            out = target.result(30)
            assert out.status_code == 200 and out.json()["finish_reasons"] == ["abort", "abort"]
            kept = bystander.result(60)  # "job-ab" is not "job-a"
            assert kept.status_code == 200 and kept.json()["finish_reasons"] == ["length"]
        finally:
            http.post("/abort/", json={})  # leave the server idle whatever happened
    wait_idle(http)
    assert_serves(http)


def test_an_error_in_one_request_fails_only_that_request(server, http):
    body = dict(prompts=[[3, 4, 5]], max_tokens=50, generation_kwargs={"ignore_eos": True})
    bad = [dict(prompts=[[1, 2, 100000]]), dict(prompts=["a"], max_tokens=10**6),
           dict(prompts=["a"], logprobs=1000), dict(prompts=["a"], generation_kwargs={"nope": 1})]
    with ThreadPoolExecutor(len(bad) + 1) as pool:
        good = pool.submit(post, server.url, body)
        wait_running(http)
        for r in pool.map(lambda b: post(server.url, b), bad):
            assert r.status_code == 400, r.text
        out = good.result(60)
    assert out.status_code == 200 and len(out.json()["completion_ids"][0]) == 50
    wait_idle(http)
    assert_serves(http)


# -- overload -------------------------------------------------------------------------------------------
def test_overload_then_recover(server, http):
    """200 long requests whose clients give up after 0.5 s: the server aborts them all, serves a fresh
    request within 5 s and, once idle, has every KV block free."""
    before = http.get("/server_info/").json()["counters"]

    async def flood():
        limits = httpx.Limits(max_connections=250, max_keepalive_connections=0)
        async with httpx.AsyncClient(base_url=server.url, timeout=0.5, limits=limits) as c:
            return await asyncio.gather(*(c.post("/generate/", json=dict(
                prompts=[[(i * 7 + j) % 250 for j in range(8)]], max_tokens=1000,
                generation_kwargs={"ignore_eos": True})) for i in range(200)), return_exceptions=True)

    results = asyncio.run(flood())
    assert all(isinstance(r, httpx.TimeoutException) for r in results), \
        [r for r in results if not isinstance(r, httpx.TimeoutException)][:3]
    start = time.monotonic()
    r = httpx.post(server.url + "/generate/", json=dict(prompts=["fresh"], max_tokens=4, temperature=0), timeout=5)
    assert r.status_code == 200 and time.monotonic() - start < 5
    wait_idle(http, timeout=30)  # free == total
    counters = http.get("/server_info/").json()["counters"]
    assert 100 <= counters["requests_aborted"] - before["requests_aborted"] <= 200  # they did reach the engine
    assert counters["requests_ok"] - before["requests_ok"] >= 1
    assert_serves(http)


# -- weight-sync faults ---------------------------------------------------------------------------------
# A trainer that joins the group, announces an update of many buckets, sends the first and dies: its gloo
# connections close, so the server's next receive fails at once instead of waiting for the group timeout.
DYING_TRAINER = textwrap.dedent("""
    import faulthandler, os, sys, torch
    from safetensors.torch import load_file
    from rlserve import Client
    from rlserve.distributed.weight_sync import pack_bucket, plan_buckets
    tensors = load_file(sys.argv[1])
    print("ready", flush=True)
    url, port, timeout_s = sys.stdin.readline().split()
    faulthandler.dump_traceback_later(30, exit=True)  # a hang shows where
    try:
        client = Client(base_url=url, group_port=int(port))
        client.init_communicator(device="cpu", timeout_s=float(timeout_s))
        buckets = plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()), 20000)
        client._request("POST", "/update_weights/", {"buckets": [b.to_dict() for b in buckets]})
        client.communicator.broadcast(pack_bucket(buckets[0], tensors, torch.device("cpu")))
        print(f"sent 1 of {len(buckets)} buckets", flush=True)
    finally:
        os._exit(1)
""")


class DyingTrainers:
    """Starts dying trainers; the next one is always importing torch while the test runs, so that each
    death costs little wall time."""

    def __init__(self, weights_file: str):
        self.weights_file = weights_file
        self.spare = self._start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", DYING_TRAINER, self.weights_file],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run_one(self, url: str, timeout: float = 90.0) -> tuple[int, list[str]]:
        proc, self.spare = self.spare, self._start()
        try:
            out, _ = proc.communicate(f"{url} {free_port()} {GROUP_TIMEOUT_S}\n", timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            pytest.fail(f"a dying trainer did not die within {timeout}s")
        return proc.returncode, out.split("\n")

    def close(self) -> None:
        self.spare.kill()
        self.spare.wait(10)


def test_weight_sync_faults_repeated_20_times(server, http, trainer, weights, model_b, expected):
    """Each round: a wrong name and a wrong shape (400, nothing applied), a re-init without close, a
    trainer killed mid-broadcast; after each, a generation that must be right."""
    dying = DyingTrainers(os.path.join(model_b, "model.safetensors"))
    try:
        for round_ in range(20):
            for bad in ({**weights["B"], "model.layers.0.mlp.nope.weight": torch.zeros(3)},
                        {**weights["B"], "model.norm.weight": torch.zeros(5)}):
                with pytest.raises(ServerError) as err:
                    trainer.client.update_weights(bad.items())
                assert err.value.status == 400 and ("nope" in err.value.message or "shape" in err.value.message)
            assert greedy(http)["completion_ids"] == expected["A"]  # nothing applied

            trainer.connect()  # re-init without close
            trainer.push("B")
            assert greedy(http)["completion_ids"] == expected["B"]

            before = stats(http)
            code, lines = dying.run_one(server.url)
            assert code == 1 and lines[0] == "ready" and lines[1].startswith("sent 1 of"), (code, lines)
            # The server notices the dead peer at once (its gloo connection closed; measured ~10 ms, not the
            # group timeout), gives up the update and keeps generating, with partly loaded weights.
            died = time.monotonic()
            after = wait_stats(http, lambda s: s["weights_partial"] and not s["weight_sync_connected"],
                               2 * GROUP_TIMEOUT_S, "the server to give up the update")
            assert time.monotonic() - died < GROUP_TIMEOUT_S / 2
            assert after["weight_version"] == before["weight_version"]  # never became a version
            out = greedy(http)
            assert [len(ids) for ids in out["completion_ids"]] == [8, 8]
            trainer.connect()  # a restarted trainer repairs everything
            trainer.push("A")
            assert greedy(http)["completion_ids"] == expected["A"]
            repaired = stats(http)
            assert not repaired["weights_partial"] and repaired["weight_sync_error"] is None
    finally:
        dying.close()
    wait_idle(http)


# -- the RL soak ----------------------------------------------------------------------------------------
def resources(server: ServerProcess) -> tuple[float, int]:
    """RSS (bytes) and open file descriptors of the server and all its children."""
    procs = tree(server)
    return sum(p.memory_info().rss for p in procs), sum(p.num_fds() for p in procs)


def test_rl_soak_300_rounds_of_generate_and_weight_update(server, http, trainer, expected):
    trainer.connect()
    body = dict(prompts=PROMPTS, max_tokens=8, temperature=0, generation_kwargs={"min_tokens": 8})
    warmup = None
    start = time.monotonic()
    for round_ in range(300):
        which = "B" if round_ % 2 == 0 else "A"  # ends on A
        version = trainer.push(which)
        r = http.post("/generate/", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["completion_ids"] == expected[which], round_
        assert out["weight_versions"] == [[version], [version]], round_
        s = stats(http)  # no KV leak: the round's blocks are all back
        assert s["kv_blocks_used"] == 0 and s["kv_blocks_free"] == s["kv_blocks_total"], (round_, s)
        if round_ == 19:
            warmup = resources(server)
    rss, fds = resources(server)
    seconds = time.monotonic() - start
    # Bounds, measured over server + children after 20 warm-up rounds and at the end (280 rounds later):
    # RSS grows by less than 50 MB, open file descriptors by at most 5.
    assert rss - warmup[0] < 50e6, f"RSS grew by {(rss - warmup[0]) / 1e6:.1f} MB in 280 rounds"
    assert fds - warmup[1] <= 5, f"file descriptors grew from {warmup[1]} to {fds}"
    print(f"soak: 300 rounds in {seconds:.1f}s; RSS {warmup[0] / 1e6:.0f} -> {rss / 1e6:.0f} MB, "
          f"fds {warmup[1]} -> {fds}")
    wait_idle(http)


# -- metrics and the load generator ---------------------------------------------------------------------
def scrape(http) -> dict[tuple[str, tuple], float]:
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def metric(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels} missing from /metrics"
    return samples[key]


def test_metrics_are_present_and_move(server, http, trainer):
    time.sleep(0.3)  # the replica's stats are pushed every 0.25 s
    m0 = scrape(http)
    rep = {"replica": "0"}
    shared = dict(prompts=[list(range(100, 140))], max_tokens=4, temperature=0)  # 2 full blocks to share
    assert post(server.url, shared).status_code == 200
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(post, server.url, LONG)
        wait_running(http, stats(http)["num_steps"] + 2)
        time.sleep(0.3)
        busy = scrape(http)
        assert metric(busy, "rlserve_running_sequences", **rep) == 1
        assert metric(busy, "rlserve_waiting_sequences", **rep) == 0
        assert metric(busy, "rlserve_kv_blocks_used", **rep) > 0
        assert http.post("/abort/", json={}).status_code == 200
        assert running.result(30).json()["finish_reasons"] == ["abort"]
    assert post(server.url, shared).status_code == 200  # a prefix-cache hit
    trainer.connect()
    version = trainer.push("A")
    wait_idle(http)
    time.sleep(0.3)
    m1 = scrape(http)
    assert metric(m1, "rlserve_requests_total", status="ok") >= metric(m0, "rlserve_requests_total", status="ok") + 2
    assert metric(m1, "rlserve_requests_total", status="aborted") == \
        metric(m0, "rlserve_requests_total", status="aborted") + 1
    metric(m1, "rlserve_requests_total", status="failed")
    assert metric(m1, "rlserve_prompt_tokens_total") >= metric(m0, "rlserve_prompt_tokens_total") + 83
    assert metric(m1, "rlserve_generation_tokens_total") > metric(m0, "rlserve_generation_tokens_total") + 8
    assert metric(m1, "rlserve_kv_blocks_used", **rep) == 0
    assert metric(m1, "rlserve_kv_blocks_free", **rep) == metric(m1, "rlserve_kv_blocks_total", **rep) == 512
    assert metric(m1, "rlserve_prefix_cache_hit_rate") > 0
    assert metric(m1, "rlserve_prefix_cache_hit_tokens_total", **rep) > \
        metric(m0, "rlserve_prefix_cache_hit_tokens_total", **rep)
    assert metric(m1, "rlserve_step_seconds", **rep) > 0
    assert metric(m1, "rlserve_engine_steps_total", **rep) > metric(m0, "rlserve_engine_steps_total", **rep)
    assert metric(m1, "rlserve_weight_sync_seconds", **rep) > 0
    assert metric(m1, "rlserve_weight_version", **rep) == version > metric(m0, "rlserve_weight_version", **rep)
    assert metric(m1, "rlserve_paused", **rep) == 0
    assert_serves(http)


def test_load_generator_reports_throughput_latency_and_failures(server, http):
    from rlserve.bench.server_bench import load_generator
    from rlserve.bench.workloads import Workload
    small = Workload("tiny", {"vocab_size": 259}, num_prompts=12, n=2, prompt_len=6, max_tokens=8, device="cpu")
    result = asyncio.run(load_generator(server.url, small, concurrency=4))
    assert result["failed"] == 0 and result["requests"] == 12
    assert result["generated_tokens"] == 12 * 2 * 8 and result["tokens_per_s"] > 0
    assert 0 < result["latency_p50_s"] <= result["latency_p90_s"] <= result["latency_p99_s"]
    # Token ids beyond the model's 259 make 400s: counted as failures, not raised.
    out_of_vocab = Workload("oov", {"vocab_size": 1000}, num_prompts=6, n=1, prompt_len=6, max_tokens=4,
                            device="cpu")
    bad = sum(any(t >= 259 for t in p) for p in out_of_vocab.prompts())
    result = asyncio.run(load_generator(server.url, out_of_vocab, concurrency=3))
    assert result["failed"] == bad > 0 and result["requests"] == 6 - bad
    wait_idle(http)
    assert_serves(http)


# -- engine failures: each ends its own server ----------------------------------------------------------
# Injected at interpreter start through sitecustomize (in the engine processes; no hook in rlserve): the model
# runner raises once its engine has run 40 forwards.
FAILING_RUNNER = """
from rlserve.engine import runner

_execute = runner.ModelRunner.execute


def _failing_execute(self, sched):
    if self.num_steps >= 40:
        raise RuntimeError(f"injected failure after {self.num_steps} steps")
    return _execute(self, sched)


runner.ModelRunner.execute = _failing_execute
"""


def test_a_forward_that_raises_fails_in_flight_requests_and_the_server_exits(tiny_model, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(FAILING_RUNNER)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    server = start_server(tiny_model, env={"PYTHONPATH": path})
    try:
        children = server.children()
        assert children
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert_serves(http)  # a few steps of the 40
            with ThreadPoolExecutor(3) as pool:
                responses = list(pool.map(lambda _: post(server.url, LONG, 60), range(3)))
            for r in responses:
                assert r.status_code == 503, r.text
                assert "injected failure" in error_of(r)
            health = http.get("/health/")
            assert health.status_code == 503 and "dead" in error_of(health)
            assert post(server.url, LONG).status_code == 503
        assert_exits(server, children, 1)
    finally:
        server.stop()


HANGING_RUNNER = FAILING_RUNNER.replace(
    'raise RuntimeError(f"injected failure after {self.num_steps} steps")',
    "import time; time.sleep(3600)  # a kernel that never finishes: the process lives, its loop does not")


def test_a_hung_engine_fails_in_flight_requests_and_the_server_exits(tiny_model, tmp_path):
    """A replica whose loop stops (alive, silent) is declared dead after --replica_timeout: its requests get a 503
    that says so instead of waiting for good, and the server exits with no child left (a supervisor restarts it)."""
    (tmp_path / "sitecustomize.py").write_text(HANGING_RUNNER)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    server = start_server(tiny_model, "--replica_timeout", "8", env={"PYTHONPATH": path})
    try:
        children = server.children()
        assert children
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert_serves(http)  # a few steps of the 40
            time.sleep(9)  # idle longer than the timeout: an idle replica still reports, and is not hung
            assert_serves(http)
            with ThreadPoolExecutor(3) as pool:
                responses = list(pool.map(lambda _: post(server.url, LONG, 60), range(3)))
            for r in responses:
                assert r.status_code == 503, r.text
                assert "engine replica 0 sent nothing for 8s (--replica_timeout): hung" in error_of(r)
            assert http.get("/health/").status_code == 503
        assert_exits(server, children, 1)
    finally:
        server.stop()


def test_a_killed_engine_process_fails_in_flight_requests_and_the_server_exits(tiny_model):
    server = start_server(tiny_model)  # also the "supervisor's restart" after the test above
    try:
        children = server.children()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert_serves(http)
            replica_pid = stats(http)["pid"]
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(post, server.url, LONG, 60) for _ in range(2)]
                wait_running(http, count=2)
                os.kill(replica_pid, signal.SIGKILL)
                responses = [f.result(30) for f in futures]
            for r in responses:
                assert r.status_code == 503, r.text
                assert "exited" in error_of(r)
            health = http.get("/health/")
            assert health.status_code == 503
        assert_exits(server, children, 1)
    finally:
        server.stop()


def test_a_killed_api_server_leaves_no_engine_behind(tiny_model):
    server = start_server(tiny_model)
    try:
        children = server.children()
        with httpx.Client(base_url=server.url, timeout=60) as http:
            assert_serves(http)
        os.kill(server.proc.pid, signal.SIGKILL)
        server.proc.wait(10)
        _, alive = psutil.wait_procs(children, timeout=15)  # the replica sees its parent gone
        assert not alive, [p.pid for p in alive]
    finally:
        server.stop()


# -- SIGTERM ------------------------------------------------------------------------------------------------
def test_sigterm_refuses_new_work_finishes_or_aborts_in_flight_work_and_exits_0(tiny_model):
    server = start_server(tiny_model, "--shutdown_timeout", "3")
    try:
        children = server.children()
        short = dict(prompts=[[1, 2]], max_tokens=20, generation_kwargs={"ignore_eos": True})
        longest = dict(LONG, max_tokens=2040, n=32)  # 65k tokens: far over 3 s even on an idle box
        with httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
            assert_serves(http)
            long_f = pool.submit(post, server.url, longest, 60)
            wait_running(http, count=32)
            short_f = pool.submit(post, server.url, short, 60)
            wait_running(http, count=33)
            # The whole process group, as systemd or a terminal's Ctrl-C would: the engine must not die
            # under the server, which drains first.
            os.killpg(server.proc.pid, signal.SIGTERM)
            time.sleep(0.2)
            r = http.post("/generate/", json=dict(prompts=["new"], max_tokens=2))
            assert r.status_code == 503 and "shutting down" in error_of(r)
            assert http.get("/health/").status_code == 503
            finished = short_f.result(30)
            assert finished.status_code == 200 and finished.json()["finish_reasons"] == ["length"]
            aborted = long_f.result(30)  # not done within --shutdown_timeout: aborted, partial output
            assert aborted.status_code == 200 and aborted.json()["finish_reasons"] == ["abort"] * 32
            assert all(0 < len(ids) < longest["max_tokens"] for ids in aborted.json()["completion_ids"])
        assert_exits(server, children, 0, timeout=30)
    finally:
        server.stop()
