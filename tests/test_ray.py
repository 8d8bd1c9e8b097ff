"""Replicas as Ray actors on a (local, CPU) multi-node Ray cluster, behind one endpoint.

Two nodes of one CPU each (so that each holds exactly one replica's bundle), on 127.0.0.1; one server with two
replicas for the whole module. Greedy output equals the offline engine's; a weight update over gloo reaches
both replicas; a replica whose actor is killed fails its own requests with a 503 naming it, the other serves
on, /health/ says "degraded", /server_info/ reports each replica's own state, and /restart_replica/ brings it
back (into the weight-sync group at the next init). Replicas all restarted after a push leave the server up
("awaiting_weights") until the trainer pushes again; a restart while paused starts paused. Each test reads the
server's state rather than relying on the tests before it.
"""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest
import torch

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
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster
    # Ray picks a node's IP by routing to an outside address; on a cluster of one machine that is not loopback.
    # With this variable (read by the raylets, their workers and the server process, which inherit it) and its
    # constant in this process (read when Ray was imported), every node's IP is 127.0.0.1. Both are restored
    # after the module: other tests never see them.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
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
    load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # noqa: E731
    return str(a), load(b), load(a)  # the server's model (path), the trainer's, the server's (loaded)


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
    _, model_b, _ = models
    want = [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]
    with Client(base_url=server.url, group_port=free_port()) as client:
        client.init_communicator(device="cpu", timeout_s=30)  # ranks 0 and 1: one per replica; the trainer 2
        assert client.update_model_params(model_b) == 1
        assert greedy(http) == want
        client.close_communicator()
    assert [r["weight_version"] for r in replicas(http)] == [1, 1]


def push(server, model) -> int:
    """The trainer's push over gloo (its own group, closed after)."""
    with Client(base_url=server.url, group_port=free_port()) as client:
        client.init_communicator(device="cpu", timeout_s=30)
        version = client.update_model_params(model)
        client.close_communicator()
    return version


def kill(http, index: int) -> dict:
    """Kill replica ``index``'s actor; returns its /server_info/ entry from before."""
    victim = replicas(http)[index]
    ray.kill(ray.get_actor(victim["ray_actor"], namespace=victim["ray_namespace"]))
    return victim


def restart(http, index: int) -> dict:
    wait_for(lambda: replicas(http)[index]["dead"], 20, f"replica {index} seen dead")
    r = http.post(f"/restart_replica/{index}", timeout=90)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_killed_replica_fails_its_requests_and_comes_back_on_restart(server, http, models):
    _, model_b, _ = models
    want = greedy(http)  # whatever the server serves now (this test does not depend on the others' pushes)
    pushed = http.get("/server_info/").json()["requested_weight_version"] > 0
    assert http.post("/pause/", json={"mode": "keep"}).status_code == 200  # requests wait in the replicas
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.post, "/generate/", json={"prompts": PROMPTS[:2], "max_tokens": MAX_TOKENS})
        wait_for(lambda: all(r.get("num_waiting", 0) + r.get("num_running", 0) > 0 for r in replicas(http)), 20,
                 "a prompt waiting on each replica")
        victim = kill(http, 0)  # replica 0: /server_info/ must not give replica 1's stats to it
        r = pending.result(timeout=30)
    assert r.status_code == 503, r.text
    assert "replica 0" in r.json()["error"]["message"], r.text
    assert http.post("/resume/").status_code == 200

    health = http.get("/health/")
    assert health.status_code == 200 and health.json()["status"] == "degraded", health.text
    assert "0" in health.json()["dead_replicas"]
    info = http.get("/server_info/").json()
    assert info["status"] == "degraded"
    dead, live = info["replicas"]
    assert [dead["replica"], live["replica"]] == [0, 1], info["replicas"]  # each its own stats
    assert dead["dead"] and not dead["alive"] and live["dead"] is None and live["alive"], info["replicas"]
    steps = live["num_steps"]
    assert greedy(http) == want  # all on replica 1
    assert replicas(http)[1]["num_steps"] > steps
    refused = http.post("/init_communicator/", json={"host": "127.0.0.1", "port": free_port(), "world_size": 3})
    assert refused.status_code == 503 and "restart_replica/0" in refused.text

    restarted = restart(http, 0)
    assert restarted["generation"] == victim["generation"] + 1
    # Back on the weights on disk: after a push it takes no request until the trainer pushes again.
    assert restarted["awaiting_weights"] is pushed
    if pushed:
        assert http.get("/health/").json()["awaiting_weights"] == [0]
        assert replicas(http)[0]["weight_version"] == 0
        steps = replicas(http)[0]["num_steps"]
        assert greedy(http) == want  # all on replica 1
        assert replicas(http)[0]["num_steps"] == steps
    push(server, model_b)  # it rejoins at the next init
    wait_for(lambda: http.get("/health/").json() == {"status": "ok"}, 10, "replica 0 serving again")
    steps = replicas(http)[0]["num_steps"]
    assert greedy(http) == [hf_greedy(model_b, p, MAX_TOKENS) for p in PROMPTS]
    info = replicas(http)
    assert info[0]["generation"] == restarted["generation"] and info[0]["weight_version"] == info[1]["weight_version"]
    assert info[0]["num_steps"] > steps  # served part of the last batch


def test_replicas_all_restarted_after_a_push_await_the_trainer_without_wedging_the_server(server, http, models):
    """Every live replica awaits the trainer's weights: the server is up (health 200, "awaiting_weights"), pause
    and resume work, generation answers 503, and the trainer can init the group and push, which ends it. A
    replica restarted while the server is paused starts paused."""
    _, model_b, model_a = models
    if http.get("/server_info/").json()["requested_weight_version"] == 0:
        push(server, model_b)  # run alone: the restarts below must follow a push
    kill(http, 1)
    assert restart(http, 1)["awaiting_weights"] is True
    kill(http, 0)  # now no live replica is routable
    wait_for(lambda: replicas(http)[0]["dead"], 20, "replica 0 seen dead")
    health = http.get("/health/")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "awaiting_weights" and health.json()["awaiting_weights"] == [1], health.text
    assert http.get("/server_info/").json()["status"] == "awaiting_weights"
    assert http.post("/pause/", json={"mode": "keep"}).status_code == 200  # reaches replica 1 only
    assert restart(http, 0)["awaiting_weights"] is True
    info = http.get("/server_info/").json()
    assert info["status"] == "awaiting_weights"
    assert [r["paused"] for r in info["replicas"]] == ["keep", "keep"], info["replicas"]  # replayed on replica 0
    assert http.post("/resume/").status_code == 200
    assert [r["paused"] for r in replicas(http)] == [None, None]
    assert http.get("/health/").json()["awaiting_weights"] == [0, 1]
    r = http.post("/generate/", json={"prompts": PROMPTS[:1], "max_tokens": 2})
    assert r.status_code == 503 and "trainer" in r.text, r.text

    push(server, model_a)  # weights other than those before the restarts: what generation sees is this push
    wait_for(lambda: http.get("/health/").json() == {"status": "ok"}, 10, "the replicas serving again")
    assert http.get("/server_info/").json()["status"] == "serving"
    assert greedy(http) == [hf_greedy(model_a, p, MAX_TOKENS) for p in PROMPTS]


def test_pinning_replica_0_outside_the_cluster_fails_at_once(cluster, monkeypatch):
    """Through Ray Client the server is no node of the cluster: --ray_pin_first_replica cannot be met, and
    says so now instead of waiting out the placement timeout."""
    from rlserve.config import EngineConfig
    from rlserve.server.replica_handles import RayPlacement
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: "10.254.254.254")
    config = EngineConfig(model="unused", device="cpu")
    with pytest.raises(RuntimeError, match="--ray_pin_first_replica false"):
        RayPlacement("ray://10.254.254.254:10001", config, 2)
    unpinned = RayPlacement(cluster.address, config, 2, pin_first=False)  # no check without pinning: no error
    assert not any(key.startswith("node:") for bundle in unpinned.bundles() for key in bundle), unpinned.bundles()


def test_closing_a_placement_ends_a_reservation_in_flight_and_forbids_a_late_one(cluster):
    """Startup reserves in a thread that its cancellation does not stop: ``close`` must remove a group still
    waiting for room (and end the wait, which would otherwise hold the process's exit), and a reservation that
    starts after ``close`` must make no group."""
    from rlserve.config import EngineConfig
    from rlserve.server.replica_handles import RayPlacement
    from ray.util import placement_group_table
    placement = RayPlacement(cluster.address, EngineConfig(model="unused", device="cpu"), 1, pin_first=False)
    placement.bundle = {"CPU": 64.0}  # more than the cluster has: pending until removed
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        reserving = pool.submit(placement.reserve, 60.0)
        wait_for(lambda: placement.group is not None, 20, "the placement group made")
        assert not reserving.done()
        placement.close()
        with pytest.raises(RuntimeError, match="stopped before its replicas were placed"):
            reserving.result(timeout=10)
    assert placement_group_table(placement.group)["state"] == "REMOVED"

    late = RayPlacement(cluster.address, EngineConfig(model="unused", device="cpu"), 1, pin_first=False)
    late.close()  # cancelled startup: close before the reservation thread ran
    with pytest.raises(RuntimeError, match="stopped before its replicas were placed"):
        late.reserve(5.0)
    assert late.group is None


class _PlacedHandle:
    """A Ray replica as routes_weights sees it: alive, on the node ``ip``."""
    remote = True

    def __init__(self, ip: str):
        self.ip = ip

    def is_alive(self):
        return True

    def node_ip(self):
        return self.ip

    def describe(self):
        return {}


def _init_weight_sync(placement, path: str, body: dict) -> dict:
    """POST ``body`` to a weight-sync init route of a 2-replica server whose replica ``i`` runs on 10.0.1.i and
    whose API server advertises 10.0.0.1; returns the GroupSpec fields sent to the replicas."""
    import asyncio

    from starlette.testclient import TestClient

    from rlserve.config import EngineConfig
    from rlserve.server.app import create_app
    from rlserve.server.replicas import EngineClient, Replica

    engine = EngineClient(EngineConfig(model="unused", device="cpu"), 2, tokenizer=None, placement=placement,
                          advertise_host="10.0.0.1")
    engine.ready.set()
    engine.replicas = [Replica(i, _PlacedHandle(f"10.0.1.{i}"), socket=None) for i in range(2)]
    sent = []

    async def call_all(op, timeout_s=30.0):  # the close of a previous group
        return []

    def send_all_nowait(op):
        sent.append(op)
        joined = asyncio.get_running_loop().create_future()
        joined.set_result(None)
        return [joined]

    engine.call_all, engine.send_all_nowait = call_all, send_all_nowait
    try:
        r = TestClient(create_app(engine)).post(path, json=body)  # no lifespan: the engine above is all there is
    finally:
        engine.ctx.destroy(linger=0)
    assert r.status_code == 200, r.text
    assert len(sent) == 1, sent
    return sent[0].spec


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "127.0.0.1", "localhost"])
@pytest.mark.parametrize("pin_first", [True, False])
def test_ray_replicas_are_told_where_rank_0_hosts_the_store_under_trl_1_10(host, pin_first):
    """TRL <= 1.10's client posts host "0.0.0.0" and the server's rank 0 (replica 0) hosts the store: a replica
    on another node must dial rank 0's node -- this node's advertised address when replica 0 is pinned here,
    else replica 0's node -- not itself."""
    import types
    spec = _init_weight_sync(types.SimpleNamespace(pin_first=pin_first), "/init_communicator/",
                             {"host": host, "port": 29500, "world_size": 3, "backend": "gloo"})
    assert spec["host"] == ("10.0.0.1" if pin_first else "10.0.1.0"), spec
    assert spec["trainer_rank"] == 2 and spec["rank_offset"] == 0


def test_a_routable_store_host_and_other_protocols_are_sent_as_given():
    """A host that names a machine is the trainer's word; local replicas share rank 0's node; under vLLM's
    protocol (TRL >= 1.12) the trainer hosts the store at its own master_address."""
    import types
    ray_placed = types.SimpleNamespace(pin_first=True)
    spec = _init_weight_sync(ray_placed, "/init_communicator/", {"host": "10.9.9.9", "port": 29500,
                                                                  "world_size": 3, "backend": "gloo"})
    assert spec["host"] == "10.9.9.9"
    for master in ("10.9.9.9", "127.0.0.1"):
        spec = _init_weight_sync(ray_placed, "/init_weight_transfer_engine/", {
            "init_info": {"master_address": master, "master_port": 29500, "world_size": 3}, "backend": "gloo"})
        assert spec["host"] == master and spec["trainer_rank"] == 0 and spec["rank_offset"] == 1


def test_local_replicas_get_the_store_host_as_given():
    import asyncio

    from rlserve.config import EngineConfig
    from rlserve.server.replicas import EngineClient
    from rlserve.server.routes_weights import _server_store_host

    async def main():
        engine = EngineClient(EngineConfig(model="unused", device="cpu"), 2, tokenizer=None)
        try:
            assert _server_store_host(engine, "0.0.0.0") == "0.0.0.0"
        finally:
            engine.ctx.destroy(linger=0)

    asyncio.run(main())


def test_messages_from_a_replaced_generation_of_a_replica_are_dropped():
    """A killed actor's late EngineDead or stats must not touch the replica that replaced it."""
    import asyncio

    from rlserve.config import EngineConfig
    from rlserve.engine import messages as msg
    from rlserve.server.replicas import EngineClient, Replica

    class Handle:
        remote = True

        def is_alive(self):
            return True

    async def main():
        engine = EngineClient(EngineConfig(model="unused", device="cpu"), 1, tokenizer=None)
        engine.tolerate_replica_death = True
        engine.ready.set()
        engine.replicas = [Replica(0, Handle(), socket=None, generation=1)]
        engine._dispatch(msg.StepOutputs(0, [], {"num_steps": 99}, generation=0))
        engine._dispatch(msg.EngineDead(0, "the old actor died", generation=0))
        assert engine.replicas[0].dead is None and engine.replicas[0].stats == {}
        engine._dispatch(msg.StepOutputs(0, [], {"num_steps": 1}, generation=1))
        assert engine.replicas[0].stats == {"num_steps": 1}
        engine._dispatch(msg.EngineDead(0, "the new actor died", generation=1))
        assert engine.replicas[0].dead == "the new actor died"
        engine.ctx.destroy(linger=0)

    asyncio.run(main())


def test_a_failed_or_cancelled_restart_leaves_the_replica_dead_and_restartable():
    """Never 'restarting' forever: the replica ends 'failed to restart: <cause>', and a later restart may try."""
    import asyncio

    from rlserve.config import EngineConfig
    from rlserve.server.errors import EngineUnavailable
    from rlserve.server.replicas import EngineClient, Replica

    class Handle:
        remote = True

        def __init__(self, alive):
            self.alive = alive

        def is_alive(self):
            return self.alive

        def exit_reason(self):
            return "exited at once"

        def kill(self):
            self.alive = False

        def describe(self):
            return {}

    class Socket:
        def close(self, linger=0):
            pass

    async def main():
        engine = EngineClient(EngineConfig(model="unused", device="cpu"), 1, tokenizer=None, placement=object())
        engine.ready.set()
        engine.replicas = [Replica(0, Handle(False), Socket(), dead="killed")]
        engine._launch = lambda index, generation: Replica(index, Handle(False), Socket(), generation=generation)
        with pytest.raises(EngineUnavailable, match="failed to restart: exited at once"):
            await engine.restart_replica(0)
        assert engine.replicas[0].dead == "engine replica 0 failed to restart: exited at once"
        engine._launch = lambda index, generation: Replica(index, Handle(True), Socket(), generation=generation)
        task = asyncio.ensure_future(engine.restart_replica(0))  # never gets ready: cancelled
        await asyncio.sleep(0.2)
        assert engine.replicas[0].dead.startswith("restarting")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.replicas[0].dead == "engine replica 0 failed to restart: cancelled"
        assert engine.replicas[0].generation == 2 and not engine.replicas[0].handle.alive
        engine.ctx.destroy(linger=0)

    asyncio.run(main())


def test_the_advertised_address_is_resolved_and_checked_before_startup_waits_on_it():
    """A replica that cannot reach the API server's sockets would only show as a startup timeout: an address
    that does not resolve, is not this host's, or is loopback while nodes at other addresses exist fails the
    start at once, saying which flag to change."""
    import types

    from rlserve.server.launcher import resolve_advertise_host

    def placement(*node_ips, this="10.0.0.5"):
        nodes = [{"NodeManagerAddress": ip, "Alive": True} for ip in node_ips]
        return types.SimpleNamespace(node_ip=this, ray=types.SimpleNamespace(nodes=lambda: nodes))

    def args(advertise_host=None, host="0.0.0.0"):
        return types.SimpleNamespace(advertise_host=advertise_host, host=host)

    on_loopback = placement("127.0.0.1", "127.0.0.1", this="127.0.0.1")  # one machine's cluster (as above)
    assert resolve_advertise_host(args(), on_loopback) == "127.0.0.1"
    assert resolve_advertise_host(args("localhost"), on_loopback) == "127.0.0.1"
    assert resolve_advertise_host(args(host="localhost"), on_loopback) == "127.0.0.1"
    # loopback on a cluster of this node alone (at another address): every replica is here
    assert resolve_advertise_host(args("127.0.0.1"), placement("10.0.0.5")) == "127.0.0.1"
    with pytest.raises(RuntimeError, match=r"--advertise_host '127.0.0.1' is 127.0.0.1, a loopback address.*10.0.0.6"):
        resolve_advertise_host(args("127.0.0.1"), placement("10.0.0.5", "10.0.0.6"))
    with pytest.raises(RuntimeError, match="--host 'localhost' is 127.0.0.1, a loopback address"):
        resolve_advertise_host(args(host="localhost"), placement("10.0.0.5", "10.0.0.6"))
    with pytest.raises(RuntimeError, match="does not resolve"):
        resolve_advertise_host(args("rlserve-no-such-host.invalid"), on_loopback)
    with pytest.raises(RuntimeError, match=r"--advertise_host '192.0.2.1' \(192.0.2.1\) is not an address of this"):
        resolve_advertise_host(args("192.0.2.1"), on_loopback)  # TEST-NET-1: never a local address
