"""Engine behaviour on a real tiny model: caching, preemption and chunking change nothing; seeds; stops;
bad input; no leaked KV blocks."""

from __future__ import annotations

import random

import pytest

from conftest import assert_no_leak
from rlserve import LLM, SamplingParams


def prompts(n=12, seed=0, low=1, high=60):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


@pytest.fixture(scope="module")
def reference(tiny_model):
    """Greedy and seeded-sampled outputs with default settings, the yardstick for the variants below."""
    llm = LLM(tiny_model, device="cpu", enable_prefix_caching=False)
    shared = [p + [1, 2, 3] for p in prompts(4, seed=9)] + [prompts(1, seed=9)[0] + [4, 5, 6]]
    batch = prompts() + shared
    greedy = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    sampled = SamplingParams(temperature=1.0, max_tokens=24, min_tokens=24, n=3, seed=5)
    return batch, greedy, sampled, tokens(llm.generate(batch, greedy)), tokens(llm.generate(batch, sampled))


@pytest.mark.parametrize("variant", [
    dict(enable_prefix_caching=True),
    dict(num_kv_blocks=12, block_size=8),  # forces preemption
    dict(max_num_batched_tokens=7),  # forces chunked prefill, mixed with decodes
    dict(block_size=4, max_num_seqs=3),
    dict(max_num_seqs=2),  # n = 3 samples run in parts; their first tokens drawn in parts of two rows
    # A budget of max_num_seqs + 1: one-token prompt chunks that draw nothing run among the decodes.
    dict(max_num_seqs=2, max_num_batched_tokens=3),
])
def test_variants_give_identical_outputs(tiny_model, reference, variant):
    batch, greedy, sampled, want_greedy, want_sampled = reference
    llm = LLM(tiny_model, device="cpu", **variant)
    assert tokens(llm.generate(batch, greedy)) == want_greedy
    assert_no_leak(llm)
    assert tokens(llm.generate(batch, sampled)) == want_sampled
    assert_no_leak(llm)
    if "num_kv_blocks" in variant:
        assert llm.stats()["num_preemptions"] > 0


def test_prefix_cache_is_hit_and_n_samples_share_prompt_blocks(tiny_model):
    llm = LLM(tiny_model, device="cpu", block_size=4)
    prompt = list(range(40, 80))  # 40 tokens = 10 blocks
    bm = llm.engine.block_manager
    peak = []
    original_step = llm.engine.step

    def step():
        updates = original_step()
        peak.append(bm.num_blocks - bm.num_free_blocks)
        return updates

    llm.engine.step = step
    out = llm.generate([prompt], SamplingParams(n=8, max_tokens=4, ignore_eos=True))[0]
    llm.engine.step = original_step
    assert len(out.outputs) == 8
    # Eight samples of 44 tokens would need 8 * 11 = 88 blocks unshared; sharing the 10 prompt blocks: 10 + 8.
    assert max(peak) <= 10 + 8
    assert_no_leak(llm)
    again = llm.generate([prompt], SamplingParams(max_tokens=2))[0]
    assert again.num_cached_tokens == 36  # 9 full blocks hit; the last one is recomputed for its logits
    assert_no_leak(llm)


def test_seeded_request_same_alone_and_in_a_batch(llm):
    params = SamplingParams(temperature=0.8, top_p=0.95, max_tokens=20, seed=1234, n=2)
    target = [5, 6, 7, 8, 9]
    alone = llm.generate([target], params)[0]
    others = prompts(6, seed=3)
    mixed = llm.generate(others[:3] + [target] + others[3:],
                         [SamplingParams(temperature=1.0, max_tokens=30)] * 3 + [params] +
                         [SamplingParams(temperature=0.5, max_tokens=10)] * 3)[3]
    assert [c.token_ids for c in alone.outputs] == [c.token_ids for c in mixed.outputs]
    assert alone.outputs[0].token_ids != alone.outputs[1].token_ids  # the samples differ from each other
    unseeded = llm.generate([target], params.clone(seed=None))[0]
    assert [c.token_ids for c in unseeded.outputs] != [c.token_ids for c in alone.outputs]
    assert_no_leak(llm)


def test_stop_strings_like_vllm(llm):
    greedy = SamplingParams(temperature=0, max_tokens=40, min_tokens=40)
    full = llm.generate(["stop test"], greedy)[0].outputs[0]
    assert len(full.text) > 6
    stop = full.text[3:5]
    out = llm.generate(["stop test"], greedy.clone(min_tokens=0, stop=[stop, "\x00never"]))[0].outputs[0]
    at = full.text.find(stop)
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:at]
    assert full.token_ids[:len(out.token_ids)] == out.token_ids and len(out.token_ids) < len(full.token_ids)
    kept = llm.generate(["stop test"], greedy.clone(min_tokens=0, stop=stop,
                                                    include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == full.text[:at + len(stop)]
    assert_no_leak(llm)


def test_stop_token_ids_min_tokens_max_tokens_ignore_eos(llm):
    greedy = SamplingParams(temperature=0, max_tokens=30, min_tokens=30)
    full = llm.generate([[10, 20, 30]], greedy)[0].outputs[0].token_ids
    stop_id = full[5]
    first = full.index(stop_id)
    out = llm.generate([[10, 20, 30]], greedy.clone(min_tokens=0, stop_token_ids=[stop_id]))[0].outputs[0]
    assert out.token_ids == full[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_id
    later = llm.generate([[10, 20, 30]], greedy.clone(min_tokens=first + 2, stop_token_ids=[stop_id]))[0].outputs[0]
    assert stop_id not in later.token_ids[:first + 2]  # masked until min_tokens, like EOS
    assert later.finish_reason == "length" or later.token_ids[-1] == stop_id
    short = llm.generate([[10, 20, 30]], greedy.clone(min_tokens=0, max_tokens=3))[0].outputs[0]
    assert short.token_ids == full[:3] and short.finish_reason == "length"
    # EOS: without min_tokens the model stops on it; ignore_eos runs to max_tokens.
    natural = llm.generate(prompts(16, seed=21), SamplingParams(temperature=1.0, max_tokens=300, seed=2))
    stopped = [c for o in natural for c in o.outputs if c.finish_reason == "stop"]
    assert stopped and all(c.token_ids[-1] in llm.info.eos_token_ids for c in stopped)
    ignored = llm.generate(prompts(4, seed=21), SamplingParams(temperature=1.0, max_tokens=100, seed=2,
                                                               ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 100 for o in ignored)
    assert_no_leak(llm)


@pytest.mark.parametrize("prompt, params, field", [
    ([], {}, "prompt must not be empty"),
    ([1, 2, 100000], {}, "outside the vocabulary"),
    ([-1], {}, "outside the vocabulary"),
    ([1] * 3000, {}, "max_model_len"),
    ([1] * 2000, {"max_tokens": 100}, "max_tokens"),
    ([1], {"stop_token_ids": [99999]}, "stop_token_ids"),
    ([1], {"logprobs": 21}, "logprobs"),
])
def test_bad_input_names_the_field_then_engine_still_serves(llm, prompt, params, field):
    with pytest.raises(ValueError, match=field):
        llm.generate([[5, 6], prompt], SamplingParams(**params))
    assert not llm.engine.has_unfinished()  # nothing of the batch was queued
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(out.outputs[0].token_ids) >= 1
    assert_no_leak(llm)


@pytest.mark.parametrize("kwargs, field", [
    ({"n": 0}, "n"), ({"temperature": -0.1}, "temperature"), ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"), ({"top_k": -2}, "top_k"), ({"min_p": 1.1}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"), ({"max_tokens": 0}, "max_tokens"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logprobs": -1}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"), ({"n": 1.5}, "n"), ({"stop": [""]}, "stop"),
    ({"seed": "x"}, "seed"),
])
def test_out_of_range_sampling_parameters_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}\b"):
        SamplingParams(**kwargs)


def test_text_prompts_and_chat(llm):
    out = llm.generate("hello", SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.prompt == "hello" and out.prompt_token_ids == list(b"hello")
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=5))[0]
    rendered = bytes(t for t in chat.prompt_token_ids if t < 256).decode()
    assert "user\nhi" in rendered and rendered.endswith("assistant\n")
    with_tools = llm.chat([[{"role": "user", "content": "hi"}]], SamplingParams(max_tokens=2),
                          tools=[{"type": "function", "function": {"name": "f"}}])[0]
    assert len(with_tools.prompt_token_ids) > len(chat.prompt_token_ids)
    assert_no_leak(llm)


def test_weight_load_changes_outputs_and_bumps_version(tiny_models):
    from pathlib import Path

    from rlserve.models.loader import iter_safetensors
    llm = LLM(tiny_models["qwen2"], device="cpu")
    before = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))[0]
    weights = [(n, t * 1.5 if n.endswith("norm.weight") else t)
               for n, t in iter_safetensors(Path(tiny_models["qwen2"]))]
    assert llm.load_weights(weights) == 1
    after = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))[0]
    assert after.outputs[0].weight_versions == [1] and before.outputs[0].weight_versions == [0]
    assert after.outputs[0].token_ids != before.outputs[0].token_ids
    with pytest.raises(ValueError, match="unknown parameter"):
        llm.load_weights([("model.nope.weight", weights[0][1])])
    with pytest.raises(ValueError, match="shape"):
        llm.load_weights([("model.norm.weight", weights[0][1])])
    assert llm.engine.weight_version == 1


def test_replica_processes_cpu_threads(monkeypatch):
    """A GPU replica (and a TP worker) runs one PyTorch CPU thread unless the user set $OMP_NUM_THREADS; CPU
    replicas share the cores between them."""
    import torch

    from rlserve.engine.core_proc import limit_cpu_threads
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    limit_cpu_threads("cuda", 2)
    limit_cpu_threads("cpu", 2)
    limit_cpu_threads("cpu", 1)  # one CPU replica keeps torch's default
    assert calls == [1, 4]
    monkeypatch.setenv("OMP_NUM_THREADS", "6")
    limit_cpu_threads("cuda", 2)  # the user's call
    limit_cpu_threads("cpu", 2)  # CPU replicas still split the cores: they would spin against each other
    assert calls == [1, 4, 4]


def test_top_logprob_rows_take_the_steps_width_and_keep_their_rows():
    """A sample's top-N storage: its width is the step's when the vocabulary is smaller than N (fixed at the first
    row), a wider step's extra columns belong to another request, and rows survive growth."""
    import numpy as np

    from rlserve.engine.sequence import TopLogprobRows
    narrow = TopLogprobRows(5)
    narrow.append(np.arange(3, dtype=np.int32)[None], np.zeros((1, 3), np.float32), 0)
    assert narrow.since(0).ids.shape == (1, 3)
    rows = TopLogprobRows(2)
    steps = [np.arange(i, i + 8, dtype=np.int32).reshape(2, 4) for i in range(40)]
    for step in steps:
        rows.append(step, -step.astype(np.float32), 1)
    out = rows.since(0)
    assert out.ids.tolist() == [step[1, :2].tolist() for step in steps]
    assert out.logprobs.tolist() == [(-step[1, :2]).tolist() for step in steps]
    assert rows.since(38).ids.tolist() == [steps[38][1, :2].tolist(), steps[39][1, :2].tolist()]


def test_requests_asking_different_top_n_in_one_batch_each_get_their_own(tiny_model):
    """One batch, the same greedy prompt asked with logprobs 0, 2, 5 and more than the vocabulary: each sample gets
    one row per token of its own width (the vocabulary at most), and the narrower rows are the wider ones' first
    columns. More than the vocabulary was a crash after the first token (the storage's first growth)."""
    import numpy as np
    llm = LLM(tiny_model, device="cpu", max_logprobs=1000)  # a server flag above the vocabulary
    vocab = llm.info.vocab_size
    asked = [0, 2, 5, vocab + 10]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=n) for n in asked]
    outs = llm.generate([[5, 6, 7, 8]] * len(asked), params)
    widest = outs[-1].outputs[0]
    assert widest.finish_reason == "length" and widest.top_n.ids.shape == (6, vocab)
    for n, out in zip(asked, outs):
        c = out.outputs[0]
        assert c.finish_reason == "length" and c.token_ids == widest.token_ids
        if n == 0:
            assert not c.top_logprobs
            continue
        assert c.top_n.ids.shape == (6, min(n, vocab))
        assert (c.top_n.ids == widest.top_n.ids[:, :n]).all()
        # the same row in another batch position: BLAS may differ in the last bits
        assert np.allclose(c.top_n.logprobs, widest.top_n.logprobs[:, :n], rtol=0, atol=1e-5)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_a_finished_or_aborted_request_is_freed_without_the_garbage_collector(tiny_model, async_scheduling):
    """A request and its samples point at each other; once it is let go the engine breaks that cycle, so that
    reference counting frees the request's token and logprob lists at once, rather than leaving them to a
    collector pass that walks them all (a 512-sample request is ~10^6 list items)."""
    import gc

    from rlserve.engine.sequence import Request

    def live_requests():  # those of this test: a Request another test still holds (a traceback) is not ours
        return [o for o in gc.get_objects() if type(o) is Request and id(o) not in earlier]

    llm = LLM(tiny_model, device="cpu", async_scheduling=async_scheduling)
    engine = llm.engine
    gc.collect()
    earlier = {id(o) for o in gc.get_objects() if type(o) is Request}
    gc.disable()
    try:
        outputs = llm.generate([[5, 6, 7], [8, 9]], SamplingParams(n=3, max_tokens=6, ignore_eos=True, logprobs=0))
        assert [len(c.token_ids) for o in outputs for c in o.outputs] == [6] * 6
        del outputs
        assert live_requests() == []
        # aborted mid-decode, and aborted before its prompt was computed (samples made empty to report the abort)
        engine.add_request("mid", [5, 6, 7], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
        for _ in range(4):
            engine.step()
        engine.add_request("queued", [9, 9], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
        updates = engine.abort_request("mid") + engine.abort_request("queued")
        assert len(updates) == 4 and all(u.finish_reason == "abort" for u in updates)
        while engine.has_unfinished():  # a step still in flight (async scheduling)
            engine.step()
        del updates
        assert live_requests() == []
    finally:
        gc.enable()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_common_draw_path_equals_the_general_one(tiny_model, async_scheduling):
    """apply_output applies a plain one-sample draw inline; a stop string that never matches, or top-1 logprobs,
    send the same draws through the general path (_apply_token). Tokens, logprobs and finish reasons agree."""
    llm = LLM(tiny_model, device="cpu", dtype="float32", async_scheduling=async_scheduling)
    batch = prompts(4, seed=11)
    base = SamplingParams(temperature=0.9, max_tokens=24, seed=5, n=3, logprobs=0, stop_token_ids=[17])
    runs = [llm.generate(batch, p) for p in (base, base.clone(stop=["\x00\x01never\x02"]), base.clone(logprobs=1))]

    def view(outs):
        return [[(c.token_ids, c.sampled_logprobs, c.finish_reason, c.stop_reason) for c in o.outputs] for o in outs]
    assert view(runs[0]) == view(runs[1]) == view(runs[2])
    assert_no_leak(llm)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_last_reference_going_frees_the_kv_cache_without_the_collector(tiny_model, async_scheduling):
    """Without ``shutdown()``: ``del llm`` frees the runner's KV cache by reference counting alone, in both modes
    and after a penalised batch (async scheduling's hooks into the penalty state once made runner <-> penalties a
    cycle: the GPU tests' next engines found no memory for a KV cache)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        llm = LLM(tiny_model, device="cpu", async_scheduling=async_scheduling, num_scheduler_steps=4)
        llm.generate([[5, 6, 7], [8, 9]], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True,
                                                         repetition_penalty=1.3, logprobs=0))
        llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))
        kv, runner = weakref.ref(llm.engine.runner.kv_cache), weakref.ref(llm.engine.runner)
        del llm
        assert runner() is None and kv() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_shutdown_gives_the_kv_cache_and_weights_back_at_once(tiny_model, async_scheduling):
    """``LLM.shutdown()`` (or leaving ``with LLM(...)``) drops the runner's KV cache and weights then, not when the
    garbage collector reaches the engine's reference cycles: the next engine on a GPU sizes its KV cache from the
    memory left. Afterwards generate refuses plainly, and a new LLM serves."""
    import weakref

    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(tiny_model, device="cpu", async_scheduling=async_scheduling) as llm:
        want = tokens(llm.generate([[5, 6, 7]], params))
        kv = weakref.ref(llm.engine.runner.kv_cache)
        weight = weakref.ref(next(llm.engine.runner.model.parameters()))
        llm.engine.add_request("in-flight", [8, 9], params)
        llm.engine.step()  # the prompt's first draw: applied at once (async_step.must_apply_first)
        llm.engine.step()  # a decode step: under async scheduling it is still in flight at shutdown
        assert (llm.engine.in_flight is not None) == async_scheduling
    assert kv() is None and weight() is None
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate([[5, 6, 7]], params)
    with pytest.raises(RuntimeError, match="shut down"):
        llm.load_weights([])
    llm.shutdown()  # twice is harmless
    again = LLM(tiny_model, device="cpu", async_scheduling=async_scheduling)
    assert tokens(again.generate([[5, 6, 7]], params)) == want


def test_a_rank_whose_kv_sizing_fails_still_joins_the_agreement(monkeypatch):
    """Tensor parallelism agrees on the KV blocks with an all-reduce: a rank that raised before it would leave
    the others waiting there. The failing rank takes part with -1, then raises its own error; the others learn
    that a rank failed; with no failure every rank gets the smallest count."""
    from rlserve.engine import worker

    class Agreement:  # the all-reduce of one rank, the other rank's value fixed
        def __init__(self, other):
            self.other, self.calls = other, []

        def min_int(self, value):
            self.calls.append(value)
            return min(value, self.other)

    def refuse(*_):
        raise ValueError("gpu_memory_utilization 0.9 asks for 126.0 GiB")

    monkeypatch.setattr(worker, "num_kv_blocks", refuse)
    tp = Agreement(other=500)
    with pytest.raises(ValueError, match="asks for"):
        worker.agreed_kv_blocks(None, None, None, tp)
    assert tp.calls == [-1]
    monkeypatch.setattr(worker, "num_kv_blocks", lambda *_: 800)
    with pytest.raises(RuntimeError, match="another tensor-parallel rank"):
        worker.agreed_kv_blocks(None, None, None, Agreement(other=-1))
    assert worker.agreed_kv_blocks(None, None, None, Agreement(other=500)) == 500
    monkeypatch.setattr(worker, "num_kv_blocks", lambda *_: 0)
    with pytest.raises(RuntimeError, match="no memory left"):
        worker.agreed_kv_blocks(None, None, None, Agreement(other=500))
