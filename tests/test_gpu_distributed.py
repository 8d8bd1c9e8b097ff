"""Two GPUs (``-m gpu``, skipped with fewer): tensor parallelism over NCCL, data-parallel replicas on their
own GPUs, and weight sync from a trainer GPU (NCCL) or host memory (gloo) into a running server."""

from __future__ import annotations

import gc
import random

import pytest
import torch

from rlserve import LLM, Client, SamplingParams
from rlserve.bench.workloads import QWEN25_05B
from rlserve.models.tiny import make_tiny_model
from hf_utils import hf_greedy
from server_utils import free_port, running_server

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def prompts(n, seed, vocab=256):
    rng = random.Random(seed)
    return [[rng.randrange(0, vocab) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=48, min_tokens=48)


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    arch = dict(QWEN25_05B, num_hidden_layers=4, initializer_range=0.05, max_position_embeddings=4096)
    return str(make_tiny_model(tmp_path_factory.mktemp("gpu2") / "rl-small-4l", "qwen2", seed=5, **arch))


@pytest.mark.parametrize("which", ["tiny", "rl-small-shape"])
def test_tp2_float32_greedy_equals_tp1(tiny_models, small_model_dir, which, caplog):
    """Also: the TP engine's teardown ends by itself (a teardown that only timed out passed here unnoticed)."""
    import torch.distributed as dist
    path = tiny_models["llama"] if which == "tiny" else small_model_dir
    batch = prompts(8, seed=1, vocab=256 if which == "tiny" else 32000)
    results = []
    for tp in (1, 2):
        llm = LLM(path, device="cuda", dtype="float32", tensor_parallel_size=tp, gpu_memory_utilization=0.4)
        results.append([o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)])
        llm.shutdown()
        assert not dist.is_initialized()
        assert "did not finish" not in caplog.text
        del llm  # its KV cache must be gone before the next engine sizes its own
        gc.collect()
        torch.cuda.empty_cache()
    assert results[0] == results[1]


def test_tp2_multi_step_bursts_give_the_tokens_of_one_step_at_a_time(tiny_models):
    """``num_scheduler_steps=8`` under TP=2, sync and with async scheduling: rank 0 broadcasts each inner step's
    draws over NCCL and the worker replays the same CUDA graphs with them. float32 greedy samples of different
    max_tokens (ending mid-burst) equal TP=1's; seeded samples (the Gumbel draw, logprobs) of one max_tokens equal
    TP=2 one step at a time, logprobs included (the same batches)."""
    import torch.distributed as dist
    batch = prompts(8, seed=3)
    greedy = [SamplingParams(temperature=0, max_tokens=20 + 4 * i, ignore_eos=True) for i in range(len(batch))]
    seeded = SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=24, ignore_eos=True, logprobs=0)
    results = {}
    sync = dict(async_scheduling=False)  # the default on CUDA is async: the sync engine is asked for by name
    for name, flags in {"tp1": dict(tensor_parallel_size=1, **sync), "tp2": dict(tensor_parallel_size=2, **sync),
                        "tp2-k8": dict(tensor_parallel_size=2, num_scheduler_steps=8, **sync),
                        "tp2-k8-async": dict(tensor_parallel_size=2, num_scheduler_steps=8, async_scheduling=True)
                        }.items():
        llm = LLM(tiny_models["llama"], device="cuda", dtype="float32", gpu_memory_utilization=0.4, **flags)
        results[name] = ([o.outputs[0].token_ids for o in llm.generate(batch, greedy)],
                         [[(c.token_ids, c.sampled_logprobs) for c in o.outputs] for o in llm.generate(batch, seeded)])
        bursts = llm.stats()["num_multi_step_launches"]
        llm.shutdown()
        assert not dist.is_initialized()
        assert (bursts > 0) == ("k8" in name), name
        del llm
        gc.collect()
        torch.cuda.empty_cache()
    for name in ("tp2-k8", "tp2-k8-async"):
        assert results[name][0] == results["tp1"][0], name
        assert results[name][1] == results["tp2"][1], name


def test_nccl_weight_sync_from_gpu0_into_a_server_on_gpu1(tiny_models, tmp_path):
    from transformers import AutoModelForCausalLM
    other = make_tiny_model(tmp_path / "b", "qwen2", seed=91)
    model_b = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).to("cuda:0").eval()
    batch = prompts(4, seed=2)
    with running_server(tiny_models["qwen2"], "--dtype", "float32", "--gpu_memory_utilization", "0.3",
                        device="cuda:1") as server:
        client = Client(base_url=server.url, group_port=free_port())
        client.init_communicator(device="cuda:0", timeout_s=60)
        assert client.communicator.backend == "nccl"
        client.update_model_params(model_b)
        out = client.generate(batch, temperature=0, max_tokens=24, generation_kwargs={"min_tokens": 24})
        assert out["completion_ids"] == [hf_greedy(model_b, p, 24) for p in batch]
        client.close_communicator()


def test_weight_sync_into_a_tp2_server_reaches_both_gpus(tiny_models, tmp_path):
    """With two GPUs both held by the server, the trainer sends through host memory (gloo)."""
    from transformers import AutoModelForCausalLM
    other = make_tiny_model(tmp_path / "b", "llama", seed=92)
    model_b = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    batch = prompts(4, seed=3)
    with running_server(tiny_models["llama"], "--dtype", "float32", "--tensor_parallel_size", "2",
                        "--gpu_memory_utilization", "0.3", device="cuda") as server:
        client = Client(base_url=server.url, group_port=free_port())
        assert client.get_world_size() == 2
        client.init_communicator(device="cpu", timeout_s=60)
        client.update_model_params(model_b)
        out = client.generate(batch, temperature=0, max_tokens=24, generation_kwargs={"min_tokens": 24})
        assert out["completion_ids"] == [hf_greedy(model_b, p, 24) for p in batch]
        client.close_communicator()


def test_data_parallel_replicas_on_their_own_gpus(tiny_models):
    batch = prompts(16, seed=4)
    with running_server(tiny_models["qwen2"], "--dtype", "float32", "--data_parallel_size", "2",
                        "--gpu_memory_utilization", "0.3", device="cuda") as server:
        client = Client(base_url=server.url)
        out = client.generate(batch, temperature=0, max_tokens=24, generation_kwargs={"min_tokens": 24})
        info = client.server_info()
        assert [r["device"] for r in info["replicas"]] == ["cuda:0", "cuda:1"]
        assert all(r["num_steps"] > 0 for r in info["replicas"])
    with LLM(tiny_models["qwen2"], device="cuda", dtype="float32", gpu_memory_utilization=0.3) as llm:
        want = [o.outputs[0].token_ids for o in llm.generate(batch, SamplingParams(temperature=0, max_tokens=24,
                                                                                    min_tokens=24))]
    assert out["completion_ids"] == want


def test_an_engine_on_gpu1_serves_calls_from_another_thread(tiny_models):
    """CUDA's current device is per thread, and a new thread starts on device 0: an LLM on cuda:1 driven from a
    worker thread (a thread pool, ``asyncio.to_thread``) still launches its kernels, graph replays and events on
    cuda:1 (async scheduling, the default, records an event per step; penalties go through pinned uploads)."""
    from concurrent.futures import ThreadPoolExecutor
    batch = prompts(8, seed=21)
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True, repetition_penalty=1.3,
                            logprobs=0)
    before = torch.cuda.current_device()
    with LLM(tiny_models["qwen2"], device="cuda:0", dtype="float32", gpu_memory_utilization=0.1):
        pass  # graphs captured on cuda:0 first: torch's default capture stream would then live there
    # (no prefix cache: the second run would reuse the first's prompt KV and compute only the last prompt token,
    # whose float32 logits then differ in the last bits)
    with LLM(tiny_models["qwen2"], device="cuda:1", dtype="float32", gpu_memory_utilization=0.3,
             enable_prefix_caching=False) as llm:
        assert torch.cuda.current_device() == before  # the building thread keeps its own current device
        assert llm.engine.runner.async_scheduling
        want = [[(c.token_ids, c.sampled_logprobs) for c in o.outputs] for o in llm.generate(batch, params)]
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(torch.cuda.current_device).result() == 0
            got = pool.submit(lambda: [[(c.token_ids, c.sampled_logprobs) for c in o.outputs]
                                       for o in llm.generate(batch, params)]).result(timeout=120)
    assert got == want
