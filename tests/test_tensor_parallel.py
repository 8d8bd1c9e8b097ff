"""Tensor parallelism on CPUs (gloo, 2 processes): the same tokens as one process, for every family, and
the same weights after an update; clear errors when the heads cannot be split."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from rlserve import LLM, Client, SamplingParams
from rlserve.models.loader import iter_safetensors
from rlserve.models.tiny import FAMILIES, make_tiny_model
from hf_utils import hf_greedy
from server_utils import free_port, running_server


def prompts(n=8, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(1, 40))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=32, min_tokens=32)


def greedy_tokens(llm, batch):
    return [o.outputs[0].token_ids for o in llm.generate(batch, GREEDY)]


@pytest.mark.parametrize("family", FAMILIES)
def test_tp2_greedy_equals_tp1(tiny_models, family):
    batch = prompts(seed=1)
    want = greedy_tokens(LLM(tiny_models[family], device="cpu"), batch)
    with LLM(tiny_models[family], device="cpu", tensor_parallel_size=2) as llm:
        assert llm.engine.runner.model.tp.size == 2
        assert greedy_tokens(llm, batch) == want
        sampled = SamplingParams(temperature=1.0, max_tokens=16, seed=3, n=2, logprobs=0)
        assert len(llm.generate(batch[:2], sampled)[0].outputs) == 2
        # top-N logprobs from rank 0's sampler: greedy, the token drawn is the most likely one
        top = SamplingParams(temperature=0, max_tokens=8, min_tokens=8, n=2, logprobs=3)
        for c in (c for o in llm.generate(batch[:3], top) for c in o.outputs):
            assert c.top_n.ids.shape == (8, 3) and c.top_n.ids[:, 0].tolist() == c.token_ids
            assert [row[0][1] for row in c.top_logprobs] == c.sampled_logprobs


def test_weight_update_with_tp2_equals_tp1(tiny_models, tmp_path):
    other = make_tiny_model(tmp_path / "b", "qwen2", seed=77)
    weights = list(iter_safetensors(other))
    batch = prompts(seed=2)
    tp1 = LLM(tiny_models["qwen2"], device="cpu")
    tp1.load_weights(weights)
    with LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2) as tp2:
        assert tp2.load_weights(weights) == 1
        assert greedy_tokens(tp2, batch) == greedy_tokens(tp1, batch)
        assert greedy_tokens(tp2, batch) == greedy_tokens(LLM(str(other), device="cpu"), batch)


def test_an_old_tp_engine_collected_late_leaves_a_newer_engines_group_alone(tiny_models, monkeypatch):
    """The cause of test_weight_update_with_tp2_equals_tp1's flakiness in full runs: a TP engine sits in a
    reference cycle (runner -> its bound broadcast method -> engine) until the garbage collector gets to it,
    and its ``__del__`` -> ``shutdown()`` destroyed *the process's default group* -- by then the next
    engine's. A collection during the next engine's start made its first collective fail ("not initialized
    in the world group map"). Forced here at the worst moment, and again while the new engine runs. (The cycle is
    gone now -- a weak proxy -- but a late ``__del__`` must still leave a newer engine's group alone.)"""
    import gc

    import torch.distributed as dist

    from rlserve.distributed import tp_engine
    batch = prompts(n=2, seed=5)
    with LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2) as old:
        want = greedy_tokens(old, batch)
    del old
    init_group = tp_engine._init_group

    def init_then_collect(*args):
        tp = init_group(*args)
        gc.collect()  # the old engine's __del__ runs here
        return tp

    monkeypatch.setattr(tp_engine, "_init_group", init_then_collect)
    with LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2) as new:
        gc.collect()
        assert dist.is_initialized()
        assert greedy_tokens(new, batch) == want
    assert not dist.is_initialized()  # its own group is destroyed on shutdown


def test_rank_0_drops_its_cuda_graphs_before_tearing_down_the_group(tiny_models, monkeypatch):
    """Graphs that captured the group's all-reduces hold NCCL's resources, and NCCL's teardown waits for them:
    rank 0's hung until its timeout on 2 x H200, and a later collective in the process never returned. The order
    is what matters (on the CPU there are no graphs to drop)."""
    import torch.distributed as dist
    calls = []
    destroy = dist.destroy_process_group
    monkeypatch.setattr(dist, "destroy_process_group", lambda: (calls.append("teardown"), destroy()))
    llm = LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2)
    release = llm.engine.runner.release_cuda_graphs
    monkeypatch.setattr(llm.engine.runner, "release_cuda_graphs", lambda: (calls.append("graphs"), release()))
    llm.shutdown()
    assert calls[:2] == ["graphs", "teardown"]  # then rank 0's memory goes (free_device_memory: no graphs left)
    assert not dist.is_initialized()


def test_shutdown_with_a_dead_worker_skips_the_graphs_and_ends(tiny_models, monkeypatch):
    """A graph replay waiting on a dead peer never ends: with a worker gone, rank 0 tears down at once."""
    import torch.distributed as dist
    llm = LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2)
    calls = []
    monkeypatch.setattr(llm.engine.runner, "release_cuda_graphs", lambda: calls.append("graphs"))
    worker = llm.engine.workers[0]
    worker.kill()
    worker.join(10)
    llm.shutdown()
    assert calls == [] and not dist.is_initialized()
    with LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2) as again:  # the process can start anew
        assert len(greedy_tokens(again, prompts(n=1, seed=6))[0]) > 0


def test_the_last_reference_going_shuts_a_tp_engine_down_without_the_collector(tiny_models):
    """``del llm`` alone: rank 0's runner (its KV cache) goes by reference counting, and the engine's ``__del__``
    shuts the workers and its group down then (the runner's step broadcast was a bound method of the engine: an
    engine <-> runner cycle that waited for the collector)."""
    import gc
    import weakref

    import torch.distributed as dist
    gc.collect()
    gc.disable()
    try:
        llm = LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2, async_scheduling=True)
        assert len(greedy_tokens(llm, prompts(n=2, seed=8))[0]) > 0
        runner, workers = weakref.ref(llm.engine.runner), list(llm.engine.workers)
        del llm
        assert runner() is None and not dist.is_initialized()
        for worker in workers:
            worker.join(30)
            assert not worker.is_alive()
    finally:
        gc.enable()


def test_tp_shutdown_gives_rank_0s_shard_back_at_once(tiny_models):
    """As a single-process engine's: rank 0's weights and KV cache go at shutdown, not when the collector reaches
    them; the LLM refuses afterwards."""
    import weakref
    llm = LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2)
    assert len(greedy_tokens(llm, prompts(n=1, seed=7))[0]) > 0
    kv = weakref.ref(llm.engine.runner.kv_cache)
    weight = weakref.ref(next(llm.engine.runner.model.parameters()))
    llm.shutdown()
    assert kv() is None and weight() is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.load_weights([])


def test_a_step_goes_to_every_worker_or_to_none():
    """TP > 2 with one worker dead: the live ones must not get the step (they would wait in its collectives for
    the dead one until NCCL's timeout); rank 0 raises before anything is sent."""
    import threading

    from rlserve.distributed.tp_engine import TensorParallelEngine

    class Proc:
        def __init__(self, name, alive):
            self.name, self.exitcode, self._alive = name, None if alive else -9, alive

        def is_alive(self):
            return self._alive

    class Pipe:
        def __init__(self):
            self.sent = []

        def send(self, message):
            self.sent.append(message)

    engine = object.__new__(TensorParallelEngine)  # the pipes and processes alone: no model, no group
    engine._pipe_lock = threading.Lock()
    engine.workers = [Proc("tp1", True), Proc("tp2", True), Proc("tp3", False)]
    engine.pipes = [Pipe(), Pipe(), Pipe()]
    with pytest.raises(RuntimeError, match="tp3 died"):
        engine._broadcast_step("a step")
    assert [p.sent for p in engine.pipes] == [[], [], []]
    engine.workers[2]._alive = True
    engine._broadcast_step("a step")
    assert [p.sent for p in engine.pipes] == [[("step", "a step")]] * 3


def test_heads_not_divisible_is_a_clear_error(tiny_models):
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 must divide the model's num_attention_heads \(4\)"):
        LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=3)


def test_server_tp2_weight_sync_reaches_every_rank(tiny_models, tmp_path):
    other = make_tiny_model(tmp_path / "b", "llama", seed=78)
    model_b = AutoModelForCausalLM.from_pretrained(other, dtype=torch.float32).eval()
    batch = prompts(n=4, seed=3)
    with running_server(tiny_models["llama"], "--tensor_parallel_size", "2") as server:
        client = Client(base_url=server.url, group_port=free_port())
        assert client.get_world_size() == 2
        client.init_communicator(device="cpu", timeout_s=30)
        client.update_model_params(model_b)
        out = client.generate(batch, temperature=0, max_tokens=16, generation_kwargs={"min_tokens": 16})
        assert out["completion_ids"] == [hf_greedy(model_b, prompt, 16) for prompt in batch]
        client.close_communicator()


def test_sweep_measures_every_layout_and_names_the_best(tiny_models, tmp_path):
    from rlserve.bench.sweep import run_sweep
    # every layout's server with the fast flags for RL rollouts (a flag a server refuses would fail its start)
    flags = ["--async_scheduling", "--num_scheduler_steps", "4"]
    report = run_sweep("cpu-tiny", 2, model=tiny_models["qwen2"], device="cpu", output_dir=str(tmp_path),
                       num_prompts=4, max_tokens=8, server_args=flags)
    assert report["server_args"] == flags
    layouts = {(r["tensor_parallel_size"], r["data_parallel_size"]) for r in report["results"]}
    assert layouts == {(1, 1), (1, 2), (2, 1)}
    assert all(r["generated_tokens"] == 4 * 4 * 8 for r in report["results"])
    assert report["best"]["tokens_per_s"] == max(r["tokens_per_s"] for r in report["results"])
    assert (tmp_path / "sweep-cpu-tiny-2cpu.png").stat().st_size > 1000
    assert (tmp_path / "sweep-cpu-tiny-2cpu.json").exists()


def test_a_replica_stops_its_engine_even_when_closing_the_weight_sync_fails():
    """A replica's close(): with a tensor-parallel worker dead, telling the workers to close the weight sync
    raises (``_send_all``); the engine's shutdown must run all the same -- it stops the live workers, which
    ignore SIGTERM as the replica does, and the interpreter's exit would otherwise wait for them forever."""
    from rlserve.engine.core_proc import EngineCoreProc

    calls = []

    class Engine:
        def close_weight_sync(self, group):
            calls.append("close_weight_sync")
            raise RuntimeError("tensor-parallel worker rlserve-tp2 died (exit code -9)")

        def shutdown(self):
            calls.append("shutdown")

    class Closes:
        def __init__(self, name):
            self.name = name

        def close(self):
            calls.append(self.name)

        def destroy(self, linger):
            calls.append(self.name)

    proc = object.__new__(EngineCoreProc)  # close() alone: no sockets, no model
    proc.engine, proc.weight_sync, proc.join_generation = Engine(), None, 0
    proc.gc_pauses, proc.ctx = Closes("gc_pauses"), Closes("ctx")
    proc.close()
    assert calls == ["close_weight_sync", "shutdown", "gc_pauses", "ctx"]


def test_a_failed_tp_start_leaves_no_group_and_a_retry_starts(tiny_models, monkeypatch):
    """Rank 0's KV sizing refuses (as a share that does not fit beside others would): rank 1 still joins the
    agreement and stops, rank 0's error reaches the caller, nobody waits out a timeout, and the group is gone,
    so the next TP engine in this process starts and serves."""
    import torch.distributed as dist
    from rlserve.engine import worker

    def refuse(*_):
        raise ValueError("gpu_memory_utilization 0.9 asks for more than fits")

    monkeypatch.setattr(worker, "num_kv_blocks", refuse)  # rank 0 only: rank 1 is a spawned process
    with pytest.raises(ValueError, match="asks for more than fits"):
        LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2)
    assert not dist.is_initialized()
    monkeypatch.undo()
    with LLM(tiny_models["qwen2"], device="cpu", tensor_parallel_size=2) as llm:
        assert greedy_tokens(llm, prompts(2)) == greedy_tokens(llm, prompts(2))
