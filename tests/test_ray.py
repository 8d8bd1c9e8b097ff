"""Replicas as Ray actors on a (local, CPU) multi-node Ray cluster, behind one endpoint.

Two nodes of one CPU each (so that each holds exactly one replica's bundle), on 127.0.0.1; one server with two
replicas for the whole module. Greedy output equals the offline engine's; a weight update over gloo reaches
both replicas; a replica whose actor is killed fails its own requests with a 503 naming it, the other serves
on, /health/ says "degraded", and /restart_replica/ brings it back (into the weight-sync group at the next
init).
"""

from __future__ import annotations

import concurrent.futures
import os
import time

import httpx
import pytest
import torch

# Ray picks a node's IP by routing to an outside address; on a cluster of one machine that is not loopback.
# With this set (read when Ray is imported; inherited by the raylets, their workers and the server process), every
# node's IP is 127.0.0.1. It concerns Ray alone.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
ray = pytest.importorskip("ray")

from transformers import AutoModelForCausalLM  # noqa: E402

from hf_utils import hf_greedy  # noqa: E402
from rlserve import Client  # noqa: E402
from rlserve.models.tiny import make_tiny_model  # noqa: E402
from server_utils import free_port, running_server  # noqa: E402

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45], list(range(100, 130)), [7, 8], [60, 61, 62, 63]]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster
    node = dict(num_cpus=1, object_store_memory=80 * 2**20, node_ip_address="127.0.0.1")
    c = Cluster(initialize_head=True, connect=True, head_node_args=dict(node, include_dashboard=False))
    try:
        c.add_node(**node)
        c.wait_for_nodes(timeout=60)
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray")
    a = make_tiny_model(root / "a", "qwen2", seed=21)
    b = make_tiny_model(root / "b", "qwen2", seed=22)
    return str(a), AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def server(cluster, models):
    with running_server(models[0], "--data_parallel_size", "2", "--ray_address", cluster.address,
                        startup_timeout=90) as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def greedy(http, prompts=PROMPTS) -> list[list[int]]:
    r = http.post("/generate/", json={"prompts": prompts, "temperature": 0, "max_tokens": MAX_TOKENS,
                                      "generation_kwargs": {"min_tokens": MAX_TOKENS}})
    assert r.status_code == 200, r.text
    return r.json()["completion_ids"]


def replicas(http) -> list[dict]:
    return http.get("/server_info/").json()["replicas"]


def wait_for(predicate, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not within {timeout_s}s")


def test_greedy_on_two_nodes_equals_the_offline_engine(http, models):
    from rlserve import LLM, SamplingParams
    info = replicas(http)
    assert len(info) == 2 and all(r["alive"] and r["dead"] is None for r in info)
    assert len({r["ray_node_id"] for r in info}) == 2, info  # one replica per node
    got = greedy(http)
    llm = LLM(models[0], device="cpu")
    try:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, min_tokens=MAX_TOKENS)
        want = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)]
    finally:
        llm.shutdown()
    assert got == [list(w) for w in want]
    assert all(r["num_steps"] > 0 for r in replicas(http))  # both replicas served part of the batch


def test_weight_update_over_gloo_reaches_both_replicas(server, http, models):
    _, model_b = models
    want = [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]
    with Client(base_url=server.url, group_port=free_port()) as client:
        client.init_communicator(device="cpu", timeout_s=30)  # ranks 0 and 1: one per replica; the trainer 2
        assert client.update_model_params(model_b) == 1
        assert greedy(http) == want
        client.close_communicator()
    assert [r["weight_version"] for r in replicas(http)] == [1, 1]


def test_a_killed_replica_fails_its_requests_and_comes_back_on_restart(server, http, models):
    _, model_b = models
    victim = replicas(http)[1]
    assert http.post("/pause/", json={"mode": "keep"}).status_code == 200  # requests wait in the replicas
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/generate/", json={"prompts": PROMPTS[:2], "max_tokens": MAX_TOKENS})
        wait_for(lambda: all(r.get("num_waiting", 0) + r.get("num_running", 0) > 0 for r in replicas(http)), 20,
                 "a prompt waiting on each replica")
        ray.kill(ray.get_actor(victim["ray_actor"], namespace=victim["ray_namespace"]))
        r = pending.result(timeout=30)
    assert r.status_code == 503, r.text
    assert "replica 1" in r.json()["error"]["message"], r.text
    assert http.post("/resume/").status_code == 200

    health = http.get("/health/")
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
    assert "1" in health.json()["dead_replicas"]
    assert http.get("/server_info/").json()["status"] == "degraded"
    assert greedy(http) == [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]  # all on replica 0
    refused = http.post("/init_communicator/", json={"host": "127.0.0.1", "port": free_port(), "world_size": 3})
    assert refused.status_code == 503 and "restart_replica/1" in refused.text

    restarted = http.post("/restart_replica/1", timeout=90)
    assert restarted.status_code == 200, restarted.text
    assert restarted.json()["generation"] == 1
    # Back on the weights on disk: it takes no request until the trainer pushes again.
    assert restarted.json()["awaiting_weights"] is True
    assert http.get("/health/").json()["awaiting_weights"] == [1]
    assert [r["weight_version"] for r in replicas(http)] == [1, 0]
    steps = replicas(http)[1]["num_steps"]
    assert greedy(http) == [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]  # all on replica 0
    assert replicas(http)[1]["num_steps"] == steps
    with Client(base_url=server.url, group_port=free_port()) as client:  # it rejoins at the next init
        client.init_communicator(device="cpu", timeout_s=30)
        client.update_model_params(model_b)
        greedy(http)  # ends the per-tensor run: every replica now holds version 2
        wait_for(lambda: http.get("/health/").json() == {"status": "ok"}, 10, "replica 1 serving again")
        assert greedy(http) == [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]
        client.close_communicator()
    info = replicas(http)
    assert info[1]["generation"] == 1 and info[0]["weight_version"] == info[1]["weight_version"] == 2
    assert info[1]["num_steps"] > steps  # served part of the last batch
