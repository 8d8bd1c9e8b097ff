"""Weight sync into a real server subprocess over gloo: correctness per family, TRL's per-tensor sequence,
validation before any byte moves, re-init, a trainer that dies mid-update, updates under load."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import httpx
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlserve import Client
from rlserve.client.client import ServerError
from rlserve.distributed.weight_sync import pack_bucket, plan_buckets, unpack_bucket
from rlserve.models.tiny import FAMILIES, make_tiny_model
from hf_utils import hf_greedy
from server_utils import free_port, running_server

PROMPTS = [[1, 2, 3], [40, 41, 42, 43, 44, 45], list(range(100, 130)), [7]]


def server_greedy(client, n=12):
    return client.generate(PROMPTS, temperature=0, max_tokens=n, generation_kwargs={"min_tokens": n})


@pytest.fixture(scope="module")
def model_pairs(tmp_path_factory):
    """family -> (path of model A the server loads, model B the trainer holds)."""
    root = tmp_path_factory.mktemp("ws")
    pairs = {}
    for i, family in enumerate(FAMILIES):
        a = make_tiny_model(root / f"{family}-a", family, seed=100 + i)
        b = make_tiny_model(root / f"{family}-b", family, seed=200 + i)
        pairs[family] = (str(a), AutoModelForCausalLM.from_pretrained(b, dtype=torch.float32).eval())
    return pairs


def test_buckets_pack_and_unpack_round_trip():
    tensors = {"a": torch.randn(3, 4), "b": torch.randn(10).to(torch.bfloat16), "c": torch.randn(2, 2, 2),
               "d": torch.randn(100)}
    buckets = plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()), bucket_bytes=64)
    assert {b.dtype for b in buckets} == {"float32", "bfloat16"}
    assert any(len(b.tensors) == 1 and b.tensors[0].name == "d" for b in buckets)  # too big: alone
    seen = {}
    for bucket in buckets:
        for name, view in unpack_bucket(bucket, pack_bucket(bucket, tensors, torch.device("cpu"))):
            seen[name] = view
    assert set(seen) == set(tensors)
    for name, t in tensors.items():
        assert torch.equal(seen[name], t)


@pytest.mark.parametrize("family", FAMILIES)
def test_update_model_params_gives_transformers_outputs_of_the_new_model(family, model_pairs):
    path_a, model_b = model_pairs[family]
    with running_server(path_a) as server:
        client = Client(base_url=server.url, group_port=free_port())
        before = server_greedy(client)
        client.init_communicator(device="cpu", timeout_s=30)
        version = client.update_model_params(model_b, bucket_size_mb=0.05)  # several buckets
        after = server_greedy(client)
        assert after["completion_ids"] == [hf_greedy(model_b, p, 12) for p in PROMPTS]
        assert after["completion_ids"] != before["completion_ids"]
        assert before["weight_version"] == 0 and after["weight_version"] == version == 1
        assert client.server_info()["weight_version"] == 1
        client.close_communicator()


def test_data_parallel_replicas_all_receive_the_update(model_pairs):
    path_a, model_b = model_pairs["qwen2"]
    with running_server(path_a, "--data_parallel_size", "2") as server:
        client = Client(base_url=server.url, group_port=free_port())
        assert client.get_world_size() == 2
        client.init_communicator(device="cpu", timeout_s=30)
        client.update_model_params(model_b)
        many = PROMPTS * 4  # spread over both replicas
        out = client.generate(many, temperature=0, max_tokens=12, generation_kwargs={"min_tokens": 12})
        assert out["completion_ids"] == [hf_greedy(model_b, p, 12) for p in many]
        replicas = client.server_info()["replicas"]
        assert [r["weight_version"] for r in replicas] == [1, 1]
        assert all(r["num_steps"] > 0 for r in replicas)
        client.close_communicator()


def test_trl_sequence_per_tensor(model_pairs):
    """init_communicator -> update_named_param for every parameter -> reset_prefix_cache -> generate ->
    close_communicator, as TRL's trainers do it."""
    path_a, model_b = model_pairs["llama"]
    with running_server(path_a) as server:
        client = Client(base_url=server.url, group_port=free_port())
        client.init_communicator(device="cpu", timeout_s=30)
        for name, param in model_b.named_parameters():
            client.update_named_param(name, param.data)
        client.reset_prefix_cache()
        out = server_greedy(client)
        assert out["completion_ids"] == [hf_greedy(model_b, p, 12) for p in PROMPTS]
        assert out["weight_version"] == 1  # one run of per-tensor updates is one version
        client.close_communicator()


def test_update_named_params_streams_what_the_iterator_yields(model_pairs):
    """TRL >= 1.12's call through rlserve.Client (trl_compat): the iterator's tensors are taken when yielded
    -- TRL's PEFT branch unmerges adapters in place after its last yield, which must not reach the server."""
    path_a, model_b = model_pairs["qwen2"]
    params = [(name, p.data.clone()) for name, p in model_b.named_parameters()]
    metadata = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in params]

    def yielding_then_spoiling():
        for name, tensor in params:
            yield name, tensor
        for _, tensor in params:
            tensor.zero_()  # after the last yield, as an in-place unmerge would

    with running_server(path_a) as server:
        client = Client(base_url=server.url, group_port=free_port())
        client.init_communicator(device="cpu", timeout_s=30)
        assert client.update_named_params(metadata, yielding_then_spoiling(), bucket_size_mb=0.05) == 1
        assert server_greedy(client)["completion_ids"] == [hf_greedy(model_b, p, 12) for p in PROMPTS]
        client.close_communicator()


def test_wrong_name_shape_or_dtype_is_400_and_nothing_changes(model_pairs):
    path_a, model_b = model_pairs["qwen2"]
    with running_server(path_a) as server:
        client = Client(base_url=server.url, group_port=free_port())
        before = server_greedy(client)["completion_ids"]
        client.init_communicator(device="cpu", timeout_s=30)
        good = dict(model_b.named_parameters())
        bad_updates = [
            {**good, "model.layers.0.mlp.nope.weight": torch.zeros(3)},
            {**good, "model.norm.weight": torch.zeros(5)},
        ]
        for named in bad_updates:
            with pytest.raises(ServerError) as err:
                client.update_weights(named.items())
            assert err.value.status == 400
            assert "nope" in err.value.message or "shape" in err.value.message
        with pytest.raises(ServerError, match="dtype") as err:
            client.update_named_param("model.norm.weight", torch.zeros(128, dtype=torch.int32))
        assert err.value.status == 400
        with pytest.raises(ServerError, match="unknown parameter"):
            client.update_named_param("lm_head.bias", torch.zeros(259))
        assert server_greedy(client)["completion_ids"] == before  # nothing applied, nothing left waiting
        assert client.server_info()["weight_version"] == 0
        client.update_model_params(model_b)  # the group still works
        assert server_greedy(client)["completion_ids"] == [hf_greedy(model_b, p, 12) for p in PROMPTS]


def test_update_without_communicator_is_409(model_pairs):
    path_a, _ = model_pairs["qwen2"]
    with running_server(path_a) as server:
        r = httpx.post(server.url + "/update_named_param/",
                       json={"name": "model.norm.weight", "dtype": "torch.float32", "shape": [128]}, timeout=30)
        assert r.status_code == 409
        assert httpx.post(server.url + "/generate/", json={"prompts": ["a"]}, timeout=30).status_code == 200


DYING_TRAINER = textwrap.dedent("""
    import os, sys, torch
    from transformers import AutoModelForCausalLM
    from rlserve import Client
    from rlserve.distributed.weight_sync import plan_buckets, pack_bucket
    url, port, model_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    client = Client(base_url=url, group_port=port)
    client.init_communicator(device="cpu", timeout_s=5)
    tensors = {n: p.data for n, p in model.named_parameters()}
    buckets = plan_buckets(((n, t.dtype, tuple(t.shape)) for n, t in tensors.items()), 20000)
    client._request("POST", "/update_weights/", {"buckets": [b.to_dict() for b in buckets]})
    client.communicator.broadcast(pack_bucket(buckets[0], tensors, torch.device("cpu")))  # one of many
    print("dying", flush=True)
    os._exit(1)
""")


def test_reinit_without_close_and_a_trainer_that_dies_mid_update(model_pairs, tmp_path):
    path_a, model_b = model_pairs["qwen2"]
    b_dir = tmp_path / "b"
    model_b.save_pretrained(b_dir)
    with running_server(path_a) as server:
        port = free_port()
        before = server_greedy(Client(base_url=server.url))["completion_ids"]
        proc = subprocess.run([sys.executable, "-c", DYING_TRAINER, server.url, str(port), str(b_dir)],
                              capture_output=True, text=True, timeout=120)
        assert "dying" in proc.stdout, proc.stderr
        # The server notices within the group timeout (5 s) and goes back to serving.
        client = Client(base_url=server.url, group_port=port)
        start = time.monotonic()
        out = server_greedy(client)
        assert time.monotonic() - start < 30
        assert len(out["completion_ids"]) == len(PROMPTS)
        info = client.server_info()
        assert info["replicas"][0]["weight_sync_error"] and info["replicas"][0]["weights_partial"]
        assert info["weight_version"] == 0  # the failed update never became a version
        # A restarted trainer re-inits (twice, without closing) on the same port and repairs everything.
        client.init_communicator(device="cpu", timeout_s=30)
        client.init_communicator(device="cpu", timeout_s=30)
        client.update_model_params(model_b)
        out = server_greedy(client)
        assert out["completion_ids"] == [hf_greedy(model_b, p, 12) for p in PROMPTS] != before
        info = client.server_info()["replicas"][0]
        assert not info["weights_partial"] and info["weight_sync_error"] is None


def test_generation_running_during_updates_all_complete(model_pairs):
    path_a, model_b = model_pairs["qwen2"]
    with running_server(path_a) as server:
        client = Client(base_url=server.url, group_port=free_port())
        client.init_communicator(device="cpu", timeout_s=30)
        results, errors = [], []

        def generate(max_tokens):
            try:
                c = Client(base_url=server.url)
                results.append(c.generate([list(range(10, 20))] * 2, n=2, max_tokens=max_tokens,
                                          generation_kwargs={"ignore_eos": True}))
            except Exception as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=generate, args=(1500 if i == 0 else 64,)) for i in range(6)]
        threads[0].start()  # the long one first: it must be running before the first update
        deadline = time.monotonic() + 30
        while client.server_info()["replicas"][0]["num_running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        for t in threads[1:]:
            t.start()
        versions = [client.update_model_params(model_b) for _ in range(3)]
        for t in threads:
            t.join(120)
        assert not errors and len(results) == 6
        assert versions == [1, 2, 3]
        for r in results:
            assert all(len(ids) == len(r["completion_ids"][0]) for ids in r["completion_ids"])
            for seen in r["weight_versions"]:
                assert seen == sorted(seen) and set(seen) <= {0, 1, 2, 3}
        longest = max(results, key=lambda r: len(r["completion_ids"][0]))
        assert len(longest["completion_ids"][0]) == 1500
        # The long request was running before the first update and finished after the last one.
        assert all(seen[0] == 0 and seen[-1] == 3 for seen in longest["weight_versions"])


def test_an_nccl_communicator_needs_its_device_named():
    """"cuda" means the calling thread's current device, and ranks join in threads (which start on device 0): the
    communicator refuses to guess; the client resolves "cuda" in the caller's thread and the engine names its own."""
    from rlserve.distributed.nccl import NCCL_UNIQUE_ID_BYTES, NcclCommunicator
    with pytest.raises(ValueError, match=r"cuda:N"):
        NcclCommunicator(bytes(NCCL_UNIQUE_ID_BYTES), 0, 2, torch.device("cuda"))
