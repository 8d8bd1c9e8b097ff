"""TRL's two weight-sync protocols, byte for byte, against a trainer side that does what vLLM's classes do
(tests/vllm_mimic.py): the store keys and pickles of the rendezvous, the barrier, vLLM's server-info layout,
the weight-transfer endpoints and vLLM's packed broadcast -- on a CPU server (gloo carries the tensors)."""

from __future__ import annotations

import os
import pickle
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlserve.distributed.rendezvous import StoreGroup, UniqueId, dumps_unique_id, loads_restricted
from rlserve.distributed.weight_sync import plan_vllm_buckets
from rlserve.models.tiny import make_tiny_model
from hf_utils import hf_greedy
from server_utils import free_port, running_server
from vllm_mimic import GlooTrainer, StatelessGroup, install_fake_vllm_unique_id, make_unique_id, packed_chunks

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45], list(range(100, 130))]


# -- the rendezvous, without a server -------------------------------------------------------------------
def test_unique_id_pickle_round_trips_with_vllms_class():
    data = os.urandom(128)
    with install_fake_vllm_unique_id() as cls:
        theirs = pickle.loads(dumps_unique_id(data))  # what vLLM's side gets from our store key
        assert type(theirs) is cls and bytes(theirs.internal) == data
        ours = loads_restricted(pickle.dumps(make_unique_id(cls, data)))  # what we get from theirs
    assert isinstance(ours, UniqueId) and bytes(ours) == data


def test_restricted_unpickler_refuses_anything_but_a_string_or_a_unique_id():
    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    for payload in (pickle.dumps(Evil()), pickle.dumps([1, 2]), pickle.dumps({"a": 1}),
                    pickle.dumps(torch.zeros(2))):
        with pytest.raises(pickle.UnpicklingError):
            loads_restricted(payload)
    assert loads_restricted(pickle.dumps("barrier_x")) == "barrier_x"


def _run_ranks(targets: list) -> list:
    results, errors = [None] * len(targets), []

    def run(i):
        try:
            results[i] = targets[i]()
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads), "a rank hung"
    return results


@pytest.mark.parametrize("trainer_is_rank0", [False, True], ids=["trl<=1.10", "vllm-weight-transfer"])
def test_store_protocol_matches_vllms_stateless_process_group(trainer_is_rank0):
    """Ours and vLLM's side in one group: the id published by rank 0 reaches every rank, and barriers (whose ids
    rank 0 publishes under the same counter) complete in both directions and clean up their keys."""
    port, world = free_port(), 3
    trainer_rank = 0 if trainer_is_rank0 else world - 1
    data = os.urandom(128)
    with install_fake_vllm_unique_id() as cls:
        def ours(rank):
            def run():
                group = StoreGroup("127.0.0.1", port, rank, world, timeout_s=30)
                uid = group.broadcast_obj(UniqueId(data) if rank == 0 else None)
                for _ in range(3):
                    group.barrier()
                return bytes(uid), group
            return run

        def theirs():
            group = StatelessGroup("127.0.0.1", port, trainer_rank, world)
            uid = group.broadcast_obj(make_unique_id(cls, data) if trainer_rank == 0 else None, src=0)
            for _ in range(3):
                group.barrier()
            return bytes(uid.internal), group

        server_ranks = [r for r in range(world) if r != trainer_rank]
        targets = {trainer_rank: theirs, **{r: ours(r) for r in server_ranks}}
        results = _run_ranks([targets[r] for r in range(world)])
    assert all(uid == data for uid, _ in results)
    master = results[0][1].store
    assert master.check(["broadcast_from/0/0"])  # the id stays; 3 barrier ids were published after it
    assert not trainer_is_rank0 or master.check([f"broadcast_from/0/{i}" for i in range(4)])  # vLLM keeps them
    if not trainer_is_rank0:  # ours deletes each barrier's keys once every rank left it
        assert not any(master.check([f"broadcast_from/0/{i}"]) for i in range(1, 4))
    assert master.num_keys() <= 1 + 3 + 1  # no arrival/departure keys left (+1: TCPStore's own counter)


def test_vllm_packed_plan_matches_the_producers_chunks():
    tensors = [("a", torch.randn(10)), ("b", torch.randn(3, 3).to(torch.bfloat16)), ("c", torch.randn(7)),
               ("d", torch.randn(100)), ("e", torch.randn(1).to(torch.float16))]
    chunks = packed_chunks(tensors, buffer_bytes=50)
    buckets = plan_vllm_buckets([n for n, _ in tensors], [str(t.dtype).removeprefix("torch.") for _, t in tensors],
                                [list(t.shape) for _, t in tensors], packed=True, buffer_bytes=50)
    assert [b.numel for b in buckets] == [c.numel() for c in chunks]
    from rlserve.distributed.weight_sync import unpack_bucket
    got = dict(kv for b, c in zip(buckets, chunks) for kv in unpack_bucket(b, c))
    for name, t in tensors:  # "c" starts at byte 58: misaligned for float32, copied before the view
        assert torch.equal(got[name], t), name


# -- against a real server --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("trlp")
    a = make_tiny_model(root / "a", "qwen2", seed=11)
    b = make_tiny_model(root / "b", "qwen2", seed=12)
    model_a = AutoModelForCausalLM.from_pretrained(a, dtype=torch.float32).eval()
    model_b = AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval()
    return str(a), model_a, model_b


def _greedy(http):
    r = http.post("/generate/", json={"prompts": PROMPTS, "temperature": 0, "max_tokens": 10,
                                      "generation_kwargs": {"min_tokens": 10}})
    assert r.status_code == 200, r.text
    return r.json()


def test_server_info_has_vllms_layout(models):
    with running_server(models[0]) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        info = http.get("/server_info", params={"config_format": "json"}).json()
        config = info["vllm_config"]
        assert config["model_config"]["logprobs_mode"] == "processed_logprobs"
        assert config["weight_transfer_config"] == {"backend": "gloo"}  # a CPU server; "nccl" on CUDA
        assert config["parallel_config"]["data_parallel_size"] == 1 and config["lora_config"] is None
        assert info["world_size"] == 1 and "weight_version" in info  # rlserve's own fields beside it
        assert http.get("/v1/models").json()["data"][0]["id"]
        assert http.get("/get_world_size").json() == {"world_size": 1}


def test_trl_110_protocol_per_tensor_with_store_barriers(models):
    """TRL <= 1.10: the server's worker is rank 0 and hosts the store; the trainer (last rank) reads the id,
    joins, and after each /update_named_param/ broadcasts and meets the server in vLLM's store barrier."""
    path, _, model_b = models
    with running_server(path) as server, httpx.Client(base_url=server.url, timeout=60) as http, \
            install_fake_vllm_unique_id() as cls:
        port = free_port()
        world = http.get("/get_world_size/").json()["world_size"] + 1
        r = http.post("/init_communicator/", json={"host": "127.0.0.1", "port": port, "world_size": world,
                                                   "client_device_uuid": "trainer-gpu"})  # TRL always sends one
        assert r.status_code == 200, r.text
        trainer = GlooTrainer("127.0.0.1", port, world - 1, world, cls)
        assert type(trainer.unique_id) is cls  # the server published vLLM's pickled ncclUniqueId
        bad = http.post("/update_named_param/", json={"name": "nope", "dtype": "torch.float32", "shape": [1]})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "name"
        for name, p in model_b.named_parameters():
            r = http.post("/update_named_param/", json={"name": name, "dtype": str(p.dtype), "shape": list(p.shape)})
            assert r.status_code == 200, r.text
            trainer.broadcast(p.data.contiguous())
            trainer.group.barrier()
        http.post("/reset_prefix_cache/").raise_for_status()  # TRL's next call: ends the run
        out = _greedy(http)
        assert out["completion_ids"] == [hf_greedy(model_b, p, 10) for p in PROMPTS]
        assert out["weight_version"] == 1  # one run of per-tensor updates is one version
        http.post("/close_communicator/").raise_for_status()


def _vllm_init(http, cls, world_extra=1):
    port = free_port()
    world = http.get("/get_world_size").json()["world_size"] + 1
    init_info = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": world}
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=http.post("/init_weight_transfer_engine",
                                                                  json={"init_info": init_info})), daemon=True)
    t.start()  # vLLM's server answers once its workers joined; the trainer joins meanwhile
    trainer = GlooTrainer("127.0.0.1", port, 0, world, cls)
    t.join(60)
    assert answer["r"].status_code == 200, answer["r"].text
    return trainer


def _vllm_update(http, trainer, named, packed=True, buffer_bytes=4096, shapes=None):
    info = {"names": [n for n, _ in named], "dtype_names": [str(t.dtype).removeprefix("torch.") for _, t in named],
            "shapes": shapes or [list(t.shape) for _, t in named], "packed": packed,
            "packed_buffer_size_bytes": buffer_bytes}
    answer = {}
    t = threading.Thread(target=lambda: answer.update(r=http.post("/update_weights", json={"update_info": info})),
                         daemon=True)
    t.start()  # the trainer broadcasts while the request is in flight, as TRL >= 1.12 does
    for chunk in (packed_chunks(named, buffer_bytes) if packed else [t.contiguous() for _, t in named]):
        trainer.broadcast(chunk)
    t.join(60)
    assert not t.is_alive()
    return answer["r"]


def test_vllm_weight_transfer_protocol_packed_and_unpacked(models):
    """TRL >= 1.12: the trainer is rank 0 and hosts the store; start / update_weights(update_info) / finish;
    vLLM's packed chunks (several, at a small buffer size) and its per-tensor broadcasts."""
    path, model_a, model_b = models
    named_b = [(n, p.data.to(torch.bfloat16 if "mlp" in n else torch.float32)) for n, p in model_b.named_parameters()]
    with running_server(path) as server, httpx.Client(base_url=server.url, timeout=60) as http, \
            install_fake_vllm_unique_id() as cls:
        trainer = _vllm_init(http, cls)
        before = _greedy(http)
        http.post("/start_weight_update", json={}).raise_for_status()
        r = _vllm_update(http, trainer, named_b, packed=True)
        assert r.status_code == 200 and r.json() == {"message": "Weights updated"}, r.text
        assert http.get("/server_info").json()["replicas"][0]["weight_version"] == 0  # not before finish
        r = http.post("/finish_weight_update", json={})
        assert r.status_code == 200 and r.json()["version"] == 1
        http.post("/reset_prefix_cache").raise_for_status()
        model_b_mixed = AutoModelForCausalLM.from_config(model_b.config).eval()
        model_b_mixed.load_state_dict({n: t.float() for n, t in named_b}, strict=False)
        out = _greedy(http)
        assert out["completion_ids"] == [hf_greedy(model_b_mixed, p, 10) for p in PROMPTS] != before["completion_ids"]
        assert out["weight_version"] == 1

        named_a = [(n, p.data) for n, p in model_a.named_parameters()]  # back to A, one broadcast per tensor
        http.post("/start_weight_update", json={}).raise_for_status()
        assert _vllm_update(http, trainer, named_a, packed=False).status_code == 200
        http.post("/finish_weight_update", json={}).raise_for_status()
        assert _greedy(http)["completion_ids"] == before["completion_ids"]


def test_vllm_update_with_wrong_shape_is_400_after_draining_and_nothing_changes(models):
    path, _, model_b = models
    named_b = [(n, p.data) for n, p in model_b.named_parameters()]
    with running_server(path) as server, httpx.Client(base_url=server.url, timeout=60) as http, \
            install_fake_vllm_unique_id() as cls:
        trainer = _vllm_init(http, cls)
        before = _greedy(http)
        shapes = [list(t.shape) for _, t in named_b]
        shapes[3] = [shapes[3][0] + 1] + shapes[3][1:]  # lies about one tensor (its bytes still travel as sent)
        http.post("/start_weight_update", json={}).raise_for_status()
        named_bad = [(n, torch.zeros(s, dtype=t.dtype) if i == 3 else t) for i, ((n, t), s)
                     in enumerate(zip(named_b, shapes))]
        r = _vllm_update(http, trainer, named_bad, packed=True)  # the trainer is not left hanging
        assert r.status_code == 400 and r.json()["error"]["param"] == "shape", r.text
        assert "update_info[3]" in r.json()["error"]["message"]
        assert http.post("/finish_weight_update", json={}).status_code == 409  # nothing to finish: no version
        out = _greedy(http)
        assert out["completion_ids"] == before["completion_ids"] and out["weight_version"] == 0
        # then a normal update works on the same group
        http.post("/start_weight_update", json={}).raise_for_status()
        assert _vllm_update(http, trainer, named_b).status_code == 200
        http.post("/finish_weight_update", json={}).raise_for_status()
        assert _greedy(http)["completion_ids"] == [hf_greedy(model_b, p, 10) for p in PROMPTS]


def test_bad_weight_transfer_bodies_are_400s_naming_the_field(models):
    with running_server(models[0]) as server, httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/init_weight_transfer_engine", json={"init_info": {"master_address": "127.0.0.1",
                                                                          "master_port": 1, "world_size": 1}})
        assert r.status_code == 400 and "world_size" in r.json()["error"]["param"]
        r = http.post("/update_weights", json={"update_info": {"names": ["a"], "dtype_names": [], "shapes": [[1]]}})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("update_info")
        r = http.post("/update_weights", json={"update_info": {"names": [], "dtype_names": [], "shapes": []}})
        assert r.status_code == 409  # no group yet
        r = http.post("/start_weight_update", json={})
        assert r.status_code == 409
        assert len(_greedy(http)["completion_ids"]) == len(PROMPTS)


def test_start_freezes_generation_until_finish_and_a_refused_update_ends_the_freeze(models):
    """No step runs between /start_weight_update and /finish_weight_update: a request sent meanwhile waits, then
    generates on the new weights only. A refused update ends the freeze at once (TRL raises and never finishes)
    and a later finish is a 409 that applies no version."""
    path, _, model_b = models
    named_b = [(n, p.data) for n, p in model_b.named_parameters()]
    with running_server(path) as server, httpx.Client(base_url=server.url, timeout=60) as http, \
            install_fake_vllm_unique_id() as cls:
        trainer = _vllm_init(http, cls)
        http.post("/start_weight_update", json={}).raise_for_status()
        answer = {}
        waiting = threading.Thread(target=lambda: answer.update(r=_greedy(http)), daemon=True)
        waiting.start()
        waiting.join(2.0)
        assert waiting.is_alive()  # frozen: no step ran
        assert _vllm_update(http, trainer, named_b).status_code == 200
        http.post("/finish_weight_update", json={}).raise_for_status()
        waiting.join(60)
        assert answer["r"]["completion_ids"] == [hf_greedy(model_b, p, 10) for p in PROMPTS]
        assert answer["r"]["weight_versions"] == [[1]] * len(PROMPTS)  # every token on the new weights

        http.post("/start_weight_update", json={}).raise_for_status()
        shapes = [list(t.shape) for _, t in named_b]
        shapes[0] = [shapes[0][0] + 1] + shapes[0][1:]
        named_bad = [(n, torch.zeros(shapes[0], dtype=t.dtype) if i == 0 else t) for i, (n, t) in enumerate(named_b)]
        assert _vllm_update(http, trainer, named_bad).status_code == 400
        start = time.monotonic()
        out = _greedy(http)  # served at once: the refusal ended the freeze
        assert time.monotonic() - start < 30 and out["weight_version"] == 1
        r = http.post("/finish_weight_update", json={})
        assert r.status_code == 409 and "refused" in r.json()["error"]["message"]
        assert http.get("/server_info").json()["weight_version"] == 1


def test_reinit_replaces_a_group_whose_trainer_never_came_or_died_with_two_replicas(models):
    """A trainer that crashed leaves a group (or a half-made one) behind; a new init replaces it, on every
    worker of two data-parallel replicas (ranks rank_offset + replica), and updates reach both."""
    path, _, model_b = models
    named_b = [(n, p.data) for n, p in model_b.named_parameters()]
    with running_server(path, "--data_parallel_size", "2") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http, install_fake_vllm_unique_id() as cls:
        world = http.get("/get_world_size/").json()["world_size"] + 1
        assert world == 3
        # TRL <= 1.10's init, whose trainer never joins (it crashed): the next init must not wait for it
        r = http.post("/init_communicator/", json={"host": "127.0.0.1", "port": free_port(), "world_size": world,
                                                   "timeout_s": 5})
        assert r.status_code == 200
        dead = _vllm_init(http, cls)  # replaces it; then this trainer "dies" mid-life (never used again)
        del dead
        trainer = _vllm_init(http, cls)  # and is replaced in turn
        http.post("/start_weight_update", json={}).raise_for_status()
        assert _vllm_update(http, trainer, named_b).status_code == 200
        http.post("/finish_weight_update", json={}).raise_for_status()
        expected = [hf_greedy(model_b, p, 10) for p in PROMPTS]
        for _ in range(2):  # both replicas serve the new weights (requests are spread by load)
            r = http.post("/generate/", json={"prompts": PROMPTS * 2, "temperature": 0, "max_tokens": 10,
                                              "generation_kwargs": {"min_tokens": 10}}).json()
            assert r["completion_ids"] == expected * 2
        replicas = http.get("/server_info").json()["replicas"]
        assert [r["weight_version"] for r in replicas] == [1, 1]


def test_vllm_protocol_reaches_every_tensor_parallel_rank(models):
    """TP=2: the workers join at rank_offset + tp rank, each receives every packed chunk and loads its shard."""
    path, _, model_b = models
    named_b = [(n, p.data) for n, p in model_b.named_parameters()]
    with running_server(path, "--tensor_parallel_size", "2") as server, \
            httpx.Client(base_url=server.url, timeout=120) as http, install_fake_vllm_unique_id() as cls:
        assert http.get("/get_world_size").json()["world_size"] == 2
        trainer = _vllm_init(http, cls)
        http.post("/start_weight_update", json={}).raise_for_status()
        assert _vllm_update(http, trainer, named_b, buffer_bytes=1 << 16).status_code == 200
        http.post("/finish_weight_update", json={}).raise_for_status()
        assert _greedy(http)["completion_ids"] == [hf_greedy(model_b, p, 10) for p in PROMPTS]
