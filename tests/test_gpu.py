"""End-to-end on CUDA (``-m gpu``): Triton attention + CUDA graphs + the fused sampler against transformers.

float32 greedy tokens equal transformers' on a tiny model and on an rl-small-shaped model for 64 tokens;
CUDA-graph and eager runs give the same tokens; sampled logprobs equal transformers' log-softmax."""

from __future__ import annotations

import random

import pytest
import torch

from rlserve import LLM, SamplingParams
from rlserve.bench.workloads import QWEN25_05B
from rlserve.models.tiny import make_tiny_model
from conftest import KernelLaunches
from hf_utils import hf_greedy

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def prompts(n, seed, vocab=256, low=1, high=60):
    rng = random.Random(seed)
    return [[rng.randrange(0, vocab) for _ in range(rng.randrange(low, high))] for _ in range(n)]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory):
    """rl-small's architecture (Qwen2.5-0.5B shape), random float32 weights, 4 layers to keep it quick."""
    arch = dict(QWEN25_05B, num_hidden_layers=4, initializer_range=0.05, max_position_embeddings=4096)
    return make_tiny_model(tmp_path_factory.mktemp("gpu") / "rl-small-4l", "qwen2", seed=3, **arch)


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3"])
def test_float32_greedy_equals_transformers_tiny(tiny_models, family):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tiny_models[family], dtype=torch.float32).cuda().eval()
    batch = prompts(8, seed=1)
    # CUDA graphs and eager, async scheduling (the default) and the synchronous engine
    for enforce_eager, use_async in ((False, True), (True, True), (False, False)):
        llm = LLM(tiny_models[family], device="cuda", dtype="float32", enforce_eager=enforce_eager,
                  async_scheduling=use_async, gpu_memory_utilization=0.3)
        outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=64, min_tokens=64))
        for prompt, out in zip(batch, outs):
            assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 64)
        llm.shutdown()  # its GPU memory goes now, not at the garbage collector's leisure


def test_float32_greedy_equals_transformers_rl_small_shape(small_model_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).cuda().eval()
    batch = prompts(8, seed=2, vocab=32000, low=5, high=200)
    llm = LLM(str(small_model_dir), device="cuda", dtype="float32", gpu_memory_utilization=0.5)
    outs = llm.generate(batch, SamplingParams(temperature=0, max_tokens=64, min_tokens=64))
    matches = [out.outputs[0].token_ids == hf_greedy(hf, p, 64) for p, out in zip(batch, outs)]
    assert all(matches), matches


def _decode_path(monkeypatch, path: str) -> KernelLaunches:
    """Decode attention as ``path`` runs it at these tests' small batches: ``default`` thresholds; ``four-warps``;
    ``one-warp`` (the gather kernel's, forced); ``tma`` (the one-warp launches' TMA kernel, forced; Hopper and
    later). Returns the TMA kernel's launch counter."""
    from rlserve.attention import triton_paged
    if path == "tma" and torch.cuda.get_device_capability()[0] < triton_paged._TMA_MIN_CAPABILITY:
        pytest.skip("the TMA decode kernel needs Hopper or later")
    if path in ("one-warp", "tma"):
        monkeypatch.setattr(triton_paged, "_ONE_WARP_MIN_PROGRAMS_PER_SM", 0)
    if path == "four-warps":
        monkeypatch.setattr(triton_paged, "_ONE_WARP_MIN_PROGRAMS_PER_SM", 1 << 30)
    if path == "one-warp":
        monkeypatch.setattr(triton_paged, "_TMA_MIN_CAPABILITY", 1 << 30)
    launches = KernelLaunches(triton_paged._decode_tma_kernel)
    monkeypatch.setattr(triton_paged, "_decode_tma_kernel", launches)
    return launches


@pytest.mark.parametrize("decode_path", ["default", "tma", "tma-shared"])
def test_cuda_graph_and_eager_give_the_same_tokens_bf16(small_model_dir, monkeypatch, decode_path):
    """bf16 tokens with CUDA graphs equal eager ones, greedy and seeded. With ``tma`` the 72 samples' decode (one
    split where 144 programs fill the SMs) runs the TMA kernel: captured in the graph of their padded size, and
    launched by the eager engine; at the default thresholds this batch takes the 4-warp gather kernel. With
    ``tma-shared`` the seeded samples of each prompt also read its first blocks once a group (the shared-prefix
    pass from 64 shared tokens), the TMA kernel reading each row's own keys: the pass's graphs replayed."""
    from rlserve.attention import triton_paged
    if decode_path != "default" and triton_paged.choose_num_splits(72, 2, torch.device("cuda")) != 1:
        pytest.skip("72 rows x 2 KV heads do not fill this GPU's SMs: their decode is split, never TMA")
    shared = decode_path == "tma-shared"
    launches = _decode_path(monkeypatch, "tma" if shared else decode_path)
    batch = prompts(24, seed=3, vocab=32000, low=5, high=100)
    params = [SamplingParams(temperature=0, max_tokens=48, min_tokens=48),
              SamplingParams(temperature=1.0, max_tokens=48, min_tokens=48, seed=7, n=3, logprobs=0)]
    results = {}
    for eager in (False, True):
        llm = LLM(str(small_model_dir), device="cuda", dtype="bfloat16", enforce_eager=eager,
                  gpu_memory_utilization=0.5, **(dict(shared_prefix_min_tokens=64) if shared else {}))
        runner = llm.engine.runner
        assert (runner.graphs is None) == eager
        if not eager:  # capture, at start-up, launched every size's kernels: the 72 rows replay the next size up
            size = runner.graphs.size_for(72)
            assert ((size, 2) in launches.grids) == (decode_path != "default")
            runner.graphs.graphs = {key: CountingGraph(g) for key, g in runner.graphs.graphs.items()}
        grouped = record_shared_groups(runner)
        launches.grids.clear()
        results[eager] = [[[c.token_ids for c in o.outputs] for o in llm.generate(batch, p)] for p in params]
        assert (max(grouped) > 0) == shared  # the seeded samples of the prompts of >= 64 tokens: groups
        if not eager:
            replays = {key: g.replays for key, g in runner.graphs.graphs.items()}
            assert (replays.get((size, True), 0) > 0) == shared, replays
        llm.shutdown()  # its GPU memory goes now, not at the garbage collector's leisure
    assert results[False] == results[True]
    assert ((72, 2) in launches.grids) == (decode_path != "default")  # the eager engine's 72 rows


def record_shared_groups(runner) -> list[int]:
    """From now on, the number of shared-prefix groups each step the runner builds plans (appended per step)."""
    grouped, build_step = [], runner.build_step

    def recording(items, block_copies):
        step = build_step(items, block_copies)
        grouped.append(sum(size > 1 for size in step.shared_group_sizes))
        return step
    runner.build_step = recording
    return grouped


class CountingGraph:
    """Wraps a captured CUDA graph and counts its replays."""

    def __init__(self, graph):
        self.graph, self.replays = graph, 0

    def replay(self):
        self.replays += 1
        self.graph.replay()


def test_samples_reading_their_prompt_once_equal_transformers_and_the_engine_without(small_model_dir):
    """The samples of a prompt read its blocks once a group (the shared-prefix pass; here from 64 shared tokens),
    float32, n = 4 of prompts of 70-200 tokens, enough rows for launches of one split (which take the pass) and a
    batch under its graph size (padding rows): with CUDA graphs (the pass's graph replayed) and eager, every
    sample's greedy tokens are transformers'; seeded sampling gives the tokens, and logprobs within float32
    rounding, of the engine without the pass (the same calls in the same order, so the same prefix-cache state)."""
    from transformers import AutoModelForCausalLM

    from rlserve.attention.triton_paged import sm_count
    from rlserve.engine.cuda_graphs import CAPTURE_SIZES
    hf = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).cuda().eval()
    kv_heads = QWEN25_05B["num_key_value_heads"]
    num_prompts = -(-sm_count(torch.device("cuda")) // (4 * kv_heads)) + 1  # B * KVH fills the SMs: one split
    while 4 * num_prompts in CAPTURE_SIZES:  # a batch under its graph size
        num_prompts += 1
    rows = 4 * num_prompts
    batch = prompts(num_prompts, seed=5, vocab=32000, low=70, high=200)
    want_greedy = [hf_greedy(hf, prompt, 32) for prompt in batch]
    greedy = SamplingParams(temperature=0, n=4, max_tokens=32, min_tokens=32)
    seeded = SamplingParams(temperature=1.0, n=4, max_tokens=32, min_tokens=32, seed=3, logprobs=0)
    sampled = {}
    for eager, min_tokens in ((False, 0), (False, 64), (True, 64)):
        llm = LLM(str(small_model_dir), device="cuda", dtype="float32", enforce_eager=eager,
                  gpu_memory_utilization=0.5, shared_prefix_min_tokens=min_tokens)
        runner = llm.engine.runner
        assert (runner.max_shared_prefix_members > 1) == (min_tokens > 0)
        assert 0 < runner.shared_prefix_min_batch <= rows or not min_tokens
        grouped = record_shared_groups(runner)
        if not eager:
            graphs = runner.graphs
            assert graphs.size_for(rows) > rows  # padding rows in the replayed graph
            graphs.graphs = {key: CountingGraph(g) for key, g in graphs.graphs.items()}
        outs = llm.generate(batch, greedy)
        for want, out in zip(want_greedy, outs):
            assert [c.token_ids for c in out.outputs] == [want] * 4
        sampled[eager, min_tokens] = [c for out in llm.generate(batch, seeded) for c in out.outputs]
        assert max(grouped) == (len(batch) if min_tokens else 0)  # each prompt's four samples, one group
        if not eager:
            replays = {key: g.replays for key, g in graphs.graphs.items()}
            assert (replays.get((graphs.size_for(rows), True), 0) > 0) == (min_tokens > 0), replays
        llm.shutdown()
    # The pass sums attention in another order: float32 logits move in the last bits, and a draw whose two best
    # Gumbel-perturbed scores are that close may flip (then the sample's tail differs). So: logprobs equal up to
    # each sample's first differing token, and at most two samples of all differing.
    want = sampled[False, 0]  # graphs, no pass
    for key in ((False, 64), (True, 64)):
        differ = 0
        for c, ref in zip(sampled[key], want):
            n = next((i for i, (a, b) in enumerate(zip(c.token_ids, ref.token_ids)) if a != b), len(ref.token_ids))
            differ += n < len(ref.token_ids)
            torch.testing.assert_close(torch.tensor(c.sampled_logprobs[:n]), torch.tensor(ref.sampled_logprobs[:n]),
                                       atol=1e-4, rtol=1e-4)
        assert differ <= 2, (key, differ, len(want))


def test_fused_sampler_logprobs_equal_transformers(small_model_dir):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).cuda().eval()
    llm = LLM(str(small_model_dir), device="cuda", dtype="float32", gpu_memory_utilization=0.5)
    assert llm.engine.runner.gumbel_sample is not None
    batch = prompts(4, seed=4, vocab=32000, low=5, high=50)
    outs = llm.generate(batch, SamplingParams(temperature=0.8, max_tokens=32, logprobs=0, seed=1, n=2,
                                              ignore_eos=True))
    for prompt, out in zip(batch, outs):
        for c in out.outputs:
            ids = torch.tensor([prompt + c.token_ids], device="cuda")
            with torch.no_grad():
                logits = hf(ids).logits[0, len(prompt) - 1:-1].float() / 0.8
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(c.token_ids, device="cuda")[:, None])
            torch.testing.assert_close(torch.tensor(c.sampled_logprobs, device="cuda"), want.squeeze(1),
                                       atol=2e-3, rtol=0)


def test_kv_cache_is_sized_from_memory_and_reported(small_model_dir):
    llm = LLM(str(small_model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.3)
    info = llm.info.summary()
    assert info["num_kv_blocks"] > 1000 and info["kv_capacity_tokens"] == info["num_kv_blocks"] * 16
    kv = llm.engine.runner.kv_cache
    assert kv.numel() * kv.element_size() < 0.3 * torch.cuda.mem_get_info()[1]


def test_engines_sharing_a_process_each_get_their_share(small_model_dir):
    """gpu_memory_utilization is each engine's share of the card (as in vLLM): a second engine in the process is
    not charged the first one's KV cache; a share that does not fit beside them is refused with the numbers, one
    that fits is not, and the two serve on, a worst-case step included (the longest prefill, penalties, 20
    logprobs)."""
    import gc
    kwargs = dict(device="cuda", dtype="bfloat16")
    with LLM(str(small_model_dir), gpu_memory_utilization=0.2, **kwargs) as first, \
            LLM(str(small_model_dir), gpu_memory_utilization=0.2, **kwargs) as second:
        blocks = [llm.info.num_kv_blocks for llm in (first, second)]
        assert blocks[0] > 1000 and abs(blocks[1] - blocks[0]) < 0.1 * blocks[0], blocks
        with pytest.raises(ValueError, match="gpu_memory_utilization 0.9 asks for"):
            LLM(str(small_model_dir), gpu_memory_utilization=0.9, **kwargs)
        gc.collect()
        with LLM(str(small_model_dir), gpu_memory_utilization=0.5, **kwargs) as third:  # what fits is not refused
            assert third.info.num_kv_blocks > 2 * blocks[0]
        longest = list(range(1, min(first.info.max_num_batched_tokens, first.info.max_model_len) - 8))
        batch = [longest] + prompts(255, seed=9)  # the longest prefill, then 256 rows through the sampler
        worst = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True, repetition_penalty=1.2, logprobs=20)
        for llm in (first, second):
            assert [len(o.outputs[0].token_ids) for o in llm.generate(batch, worst)] == [4] * 256
            assert len(llm.generate([[1, 2, 3]], SamplingParams(max_tokens=8, ignore_eos=True))[0].outputs[0]
                       .token_ids) == 8


def test_fused_layer_kernels_pass_their_self_check():
    from rlserve.layers import fused
    assert fused.enabled(torch.device("cuda", 0), torch.bfloat16)
    assert fused.enabled(torch.device("cuda", 0), torch.float32)


def test_prompt_logprobs_equal_transformers(small_model_dir):
    """Teacher scoring on CUDA: prefill chunks of several prompts scored beside decodes, fp32 vs transformers."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(small_model_dir, dtype=torch.float32).cuda().eval()
    llm = LLM(str(small_model_dir), device="cuda", dtype="float32", gpu_memory_utilization=0.5,
              max_num_batched_tokens=256)
    batch = prompts(6, seed=5, vocab=32000, low=2, high=600)
    params = SamplingParams(n=2, temperature=0.7, max_tokens=8, min_tokens=8, prompt_logprobs=20)
    outs = llm.generate(batch, params)
    for prompt, out in zip(batch, outs):
        with torch.no_grad():
            ref = torch.log_softmax(hf(torch.tensor([prompt], device="cuda")).logits[0, :-1].float() / 0.7, -1)
        pl = out.prompt_logprobs
        actual = ref.gather(1, torch.tensor(prompt[1:], device="cuda")[:, None]).squeeze(1)
        torch.testing.assert_close(torch.from_numpy(pl.logprobs).cuda(), actual, atol=2e-3, rtol=0)
        top_values, top_ids = ref.topk(20, dim=-1)
        torch.testing.assert_close(torch.from_numpy(pl.top_logprobs).cuda(), top_values, atol=2e-3, rtol=0)
        assert (torch.from_numpy(pl.top_ids[:, 0]).cuda() == top_ids[:, 0]).float().mean() > 0.99
        assert [len(c.token_ids) for c in out.outputs] == [8, 8]


def test_async_scheduling_launch_never_waits_for_the_device_and_matches_sync(tiny_models, monkeypatch):
    """Async scheduling on CUDA, a steady float32 greedy decode batch: every launch of a step that runs ahead
    (not a fallback step, ``async_step.must_apply_first``) runs under ``torch.cuda.set_sync_debug_mode("error")``,
    so a hidden host sync in the launch path -- a pageable upload, an ``.item()``, a ``synchronize`` -- raises
    there; and the tokens equal the synchronous engine's (same batch shapes: no sample stops by content)."""
    from rlserve.engine.async_step import must_apply_first
    model = tiny_models["qwen2"]
    batch = prompts(8, seed=11)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    sync_llm = LLM(model, device="cuda", dtype="float32", gpu_memory_utilization=0.3, async_scheduling=False)
    want = [o.outputs[0].token_ids for o in sync_llm.generate(batch, params)]
    sync_llm.shutdown()
    llm = LLM(model, device="cuda", dtype="float32", gpu_memory_utilization=0.3, async_scheduling=True)
    assert llm.engine.runner.graphs is not None  # the decode steps replay CUDA graphs, as in production
    warm = [o.outputs[0].token_ids for o in llm.generate(batch, params)]  # first-use compilation, unchecked
    runner = llm.engine.runner
    launch = runner.launch
    checked = []

    def strict_launch(sched):
        if must_apply_first(sched):  # applied before the next step anyway: it may wait
            return launch(sched)
        torch.cuda.set_sync_debug_mode("error")
        try:
            launched = launch(sched)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked.append(sched)
        return launched

    monkeypatch.setattr(runner, "launch", strict_launch)
    got = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    assert got == want and warm == want
    assert len(checked) >= 31  # the prefill (n = 1: no fork, it runs ahead too) and 31 decode steps; none fell back
    assert all(len(s.scheduled) == len(batch) for s in checked)


@pytest.mark.parametrize("decode_path", ["four-warps", "one-warp", "tma"])
def test_multi_step_launches_give_the_same_tokens_and_never_wait_bf16(small_model_dir, monkeypatch, decode_path):
    """``num_scheduler_steps=8`` (bf16, CUDA graphs): a burst feeds each step's draws to the next on the device and
    draws with each output position's seeds, so tokens and logprobs equal one step at a time, bit for bit (no
    sample stops by content: the batches are the same); with async scheduling too, where every burst's launch
    runs under ``set_sync_debug_mode("error")`` (no hidden host sync). Under every decode launch: these batches (24
    and 72 sequences, 2 KV heads) are below the one-warp threshold, which is forced for the gather kernel's one-warp
    config and for the TMA kernel (Hopper and later: it takes block size 16 and this model's head dim 64; the 72
    samples' launches have one split, which it needs, on a GPU of up to 144 SMs; the 24 greedy rows' have several)."""
    from rlserve.attention import triton_paged
    if decode_path == "tma" and triton_paged.choose_num_splits(72, 2, torch.device("cuda")) != 1:
        pytest.skip("72 rows x 2 KV heads do not fill this GPU's SMs: their decode is split, never TMA")
    launches = _decode_path(monkeypatch, decode_path)
    batch = prompts(24, seed=4, vocab=32000, low=5, high=100)
    params = [SamplingParams(temperature=0, max_tokens=45, ignore_eos=True, logprobs=0),
              SamplingParams(temperature=1.0, max_tokens=45, ignore_eos=True, seed=7, n=3, logprobs=0)]

    def run(llm):
        return [[[(c.token_ids, c.sampled_logprobs) for c in o.outputs] for o in llm.generate(batch, p)]
                for p in params]

    results, bursts, tma_graphs = {}, {}, []
    for steps, use_async in ((1, False), (8, False), (8, True)):
        llm = LLM(str(small_model_dir), device="cuda", dtype="bfloat16", gpu_memory_utilization=0.5,
                  num_scheduler_steps=steps, async_scheduling=use_async)
        assert llm.engine.runner.graphs is not None
        # Whether the graph the 72 samples replay (the next captured size up) was captured with the TMA kernel; the
        # 24 greedy rows' graph never is (its decode is split).
        sizes = llm.engine.runner.graphs.sizes
        assert (min(s for s in sizes if s >= 24), 2) not in launches.grids
        tma_graphs.append((min(s for s in sizes if s >= 72), 2) in launches.grids)
        launches.grids.clear()
        if use_async:
            run(llm)  # first-use compilation, unchecked
            # A cached prompt recomputes only its last block's tokens, in other matmul shapes and, for one token,
            # through the decode kernel: its logits need not equal a whole prompt's prefill bit for bit (with
            # 32-key decode tiles they did not). The runs compared here all start on an empty cache.
            llm.reset_prefix_cache()
            launch, checked = llm.engine.runner.launch, []

            def strict_launch(sched, launch=launch, checked=checked):
                if sched.num_steps == 1:
                    return launch(sched)
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return launch(sched)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                    checked.append(sched)

            monkeypatch.setattr(llm.engine.runner, "launch", strict_launch)
        before = llm.stats()["num_multi_step_launches"]
        results[steps, use_async] = run(llm)
        bursts[steps, use_async] = llm.stats()["num_multi_step_launches"] - before
        llm.shutdown()  # its GPU memory goes now, not at the garbage collector's leisure
    assert results[8, False] == results[1, False] and results[8, True] == results[1, False]
    # 44 decode steps after the first draw: 5 bursts of 8 and one of 4, per generate call
    assert bursts == {(1, False): 0, (8, False): 12, (8, True): 12}
    assert len(checked) == 12
    assert tma_graphs == {True: [True] * 3, False: [False] * 3}[decode_path == "tma"]


def test_multi_step_rows_past_their_max_tokens_float32(tiny_models):
    """Samples of one burst with different max_tokens: one that reaches its own runs on to the burst's end with
    slot -1 (no KV write) and token 0, its draws dropped, while the others keep drawing. float32 greedy tokens equal
    one step at a time's -- with CUDA graphs, eager, async scheduling, and a waiting queue (max_num_seqs 16 for 24
    prompts) -- every sample ends at its max_tokens, and every block comes back."""
    model = tiny_models["qwen2"]
    batch = prompts(24, seed=12)
    params = [SamplingParams(temperature=0, max_tokens=17 + 3 * (i % 8), logprobs=0, ignore_eos=True)
              for i in range(len(batch))]
    sync = dict(async_scheduling=False)  # the default on CUDA is async: the sync engine is asked for by name
    variants = {"k1": dict(num_scheduler_steps=1, **sync), "k8": dict(num_scheduler_steps=8, **sync),
                "k8-async": dict(num_scheduler_steps=8, async_scheduling=True),
                "k8-eager": dict(num_scheduler_steps=8, enforce_eager=True, **sync),
                "k8-waiting": dict(num_scheduler_steps=8, max_num_seqs=16)}  # the default: async
    results = {}
    for name, flags in variants.items():
        before = torch.cuda.memory_allocated()
        llm = LLM(model, device="cuda", dtype="float32", gpu_memory_utilization=0.3, **flags)
        results[name] = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
        assert [len(t) for t in results[name]] == [p.max_tokens for p in params], name
        assert (llm.stats()["num_multi_step_launches"] > 0) == (name != "k1"), name
        bm = llm.engine.block_manager
        bm.check_invariants()
        assert bm.num_free_blocks == bm.num_blocks, name
        llm.shutdown()  # its GPU memory goes now, not at the garbage collector's leisure
        # Its KV cache (~40 GiB at 0.3 of an H200) is gone, not waiting for the collector: five engines at 0.3 fit
        # one after another. What stays is the process's CUDA libraries' workspaces (~100 MiB after the first).
        assert torch.cuda.memory_allocated() < before + 2**30, name
    assert all(got == results["k1"] for got in results.values())
