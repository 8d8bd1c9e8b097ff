"""Async scheduling (``EngineConfig.async_scheduling``) gives what the synchronous engine gives, and overlaps.

Each case runs the same prompts through an engine with the flag off and one with it on. Token ids, finish
reasons and stop reasons must be identical. Logprob values are compared exactly where no sample ends by content
(EOS, stop token, stop string) while others still run; where one does, its extra token in the next step puts one
more row of the same context length beside its siblings in the reference attention's batched decode, and the
CPU kernels' rounding depends on that batch (the synchronous engine shows the same ~1e-6 when a neighbour of
equal length joins): those values are compared to 1e-5.
"""

from __future__ import annotations

import random
import re

import httpx
import torch
import pytest

from conftest import assert_no_leak
from rlserve import LLM, SamplingParams
from rlserve.engine import async_step
from server_utils import running_server


def prompts(n=8, seed=0, low=2, high=24):
    rng = random.Random(seed)
    return [[rng.randrange(0, 256) for _ in range(rng.randrange(low, high))] for _ in range(n)]


def outputs(results) -> tuple[list, list[float]]:
    """Everything a client reads of each sample, and apart, every logprob value in order."""
    meta, values = [], []
    for r in results:
        meta.append([r.num_cached_tokens])
        for c in r.outputs:
            meta[-1].append((c.token_ids, c.finish_reason, c.stop_reason, c.text, c.weight_versions,
                             None if c.top_logprobs is None else [[t for t, _ in row] for row in c.top_logprobs]))
            values += c.sampled_logprobs or []
            values += [v for row in c.top_logprobs or [] for _, v in row]
    return meta, values


def assert_same(want, got, exact_logprobs: bool) -> None:
    assert got[0] == want[0]
    if exact_logprobs:
        assert got[1] == want[1]
    else:
        assert len(got[1]) == len(want[1]) and max(map(abs, map(float.__sub__, got[1], want[1])), default=0) < 1e-5


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]  # on CUDA: its pinned, no-wait paths (the default)


def engine_kwargs(device: str) -> dict:
    return dict(device=device, dtype="float32", gpu_memory_utilization=0.15)  # two engines share the GPU


@pytest.fixture(scope="module", params=DEVICES)
def engines(tiny_model, request):
    """{async_scheduling: LLM}, default settings, on the CPU and (``-m gpu``) on CUDA."""
    llms = {flag: LLM(tiny_model, async_scheduling=flag, **engine_kwargs(request.param)) for flag in (False, True)}
    yield llms
    for llm in llms.values():
        llm.shutdown()


def same(engines, batch, params, exact_logprobs=True):
    want, got = (outputs(engines[flag].generate(batch, params)) for flag in (False, True))
    assert_same(want, got, exact_logprobs)
    for llm in engines.values():
        assert_no_leak(llm)
    return want[0]


def test_greedy_seeded_and_logprobs_are_identical(engines):
    batch = prompts()
    same(engines, batch, SamplingParams(temperature=0, max_tokens=20, logprobs=3, ignore_eos=True))
    # Different lengths per prompt: each ends by max_tokens while the others run on.
    same(engines, batch, [SamplingParams(temperature=1.0, seed=i, max_tokens=5 + 3 * i, logprobs=0, ignore_eos=True)
                          for i in range(len(batch))])
    same(engines, batch, SamplingParams(temperature=0.8, top_k=20, top_p=0.9, min_p=0.01, max_tokens=16,
                                        logprobs=2, ignore_eos=True))


def early_stop_cases() -> list[tuple[list, object, object]]:
    """(prompts, params, check of the outputs) where samples end by content while others run on -- EOS (n=3), stop
    token ids after min_tokens, stop strings: the cases that end a sample before its step (or burst) does."""
    batch = prompts(seed=1)
    stopping = [SamplingParams(temperature=1.0, seed=i, max_tokens=30, min_tokens=i % 3 * 4,
                               stop_token_ids=list(range(i * 20, i * 20 + 12)), logprobs=0) for i in range(len(batch))]
    return [(batch, SamplingParams(temperature=1.0, n=3, max_tokens=40, logprobs=1),
             lambda got: any(s[1] == "stop" for r in got for s in r[1:])),  # some samples ended on EOS
            (batch, stopping, lambda got: any(r[1][1] == "stop" and isinstance(r[1][2], int) for r in got)),
            (prompts(seed=2), SamplingParams(temperature=1.0, seed=3, max_tokens=40, stop=["a", "e", "o"]),
             lambda got: any(r[1][2] in ("a", "e", "o") for r in got))]


def test_samples_ending_by_eos_stop_tokens_and_stop_strings(engines):
    for batch, params, check in early_stop_cases():
        assert check(same(engines, batch, params, exact_logprobs=False))


def test_penalties_counted_from_the_device_match(engines):
    batch = prompts(seed=3)
    same(engines, batch, SamplingParams(temperature=1.0, seed=4, max_tokens=20, repetition_penalty=1.3,
                                        presence_penalty=0.5, frequency_penalty=0.4, logprobs=0))


def test_prefix_cache_hits_are_the_same(engines):
    shared = list(range(30, 70))  # 40 tokens: two full blocks of 16 shared by every prompt
    batch = [shared + p for p in prompts(seed=4)]
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=24, logprobs=0)
    same(engines, batch, params, exact_logprobs=False)
    cached = same(engines, batch, params, exact_logprobs=False)  # now from the cache
    assert all(r[0] >= 32 for r in cached)


def test_structured_outputs_and_prompt_logprobs_fall_back_and_match(engines):
    batch = prompts(4, seed=5)
    guided = same(engines, batch, SamplingParams(temperature=1.0, seed=6, max_tokens=12,
                                                 structured_outputs={"regex": "[a-c]{3,8}"}))
    assert all(re.fullmatch("[a-c]{3,8}", r[1][3]) for r in guided)
    results = [engines[flag].generate(batch, SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=2))
               for flag in (False, True)]
    for a, b in zip(*results):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert (a.prompt_logprobs.logprobs == b.prompt_logprobs.logprobs).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [
    dict(num_kv_blocks=12, block_size=8),  # forces preemption
    dict(max_num_batched_tokens=7),  # chunked prefill, mixed with decodes
    dict(max_num_seqs=2, max_num_batched_tokens=3),
])
def test_preemption_and_chunked_prefill(tiny_model, variant, device):
    llms = {flag: LLM(tiny_model, async_scheduling=flag, **engine_kwargs(device), **variant) for flag in (False, True)}
    batch = prompts(6, seed=6)
    same(llms, batch, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), exact_logprobs=False)
    same(llms, batch, SamplingParams(temperature=1.0, n=2, seed=7, max_tokens=24, logprobs=0), exact_logprobs=False)
    if "num_kv_blocks" in variant:
        assert all(llm.stats()["num_preemptions"] > 0 for llm in llms.values())
    for llm in llms.values():
        llm.shutdown()


def test_context_end_stops_running_ahead(tiny_model):
    """max_tokens None: each sample runs to max_model_len, where its in-flight draw is its last."""
    llms = {flag: LLM(tiny_model, device="cpu", max_model_len=32, async_scheduling=flag) for flag in (False, True)}
    batch = prompts(4, seed=13)
    ended = same(llms, batch, SamplingParams(temperature=0, max_tokens=None, ignore_eos=True, logprobs=0))
    assert [len(r[1][0]) for r in ended] == [32 - len(p) for p in batch]


def run_engine(llm, batch, params, between=None, at_step=3, max_steps=500):
    """Drive the engine by hand; ``between(llm)`` runs after ``at_step`` steps and may return updates. Returns
    {request id: (token ids, finish reason, weight versions)}."""
    engine = llm.engine
    for i, p in enumerate(batch):
        engine.add_request(f"r{i}", p, params)
    got: dict[str, list] = {}

    def take(updates):
        for u in updates:
            tokens, _, _ = got.setdefault(u.request_id, ([], None, None))
            assert got[u.request_id][1] is None, f"{u.request_id}: an update after it finished"
            got[u.request_id] = (tokens + u.token_ids, u.finish_reason, u.weight_versions)

    for step in range(max_steps):
        if not engine.has_unfinished():
            break
        if step == at_step and between is not None:
            take(between(llm) or [])
        take(engine.step())
    assert not engine.has_unfinished()
    return got


@pytest.mark.parametrize("device", DEVICES)
def test_weight_update_and_cache_reset_mid_flight_drain_first(tiny_models, device):
    from pathlib import Path

    from rlserve.models.loader import iter_safetensors
    weights = [(n, t * 1.5 if n.endswith("norm.weight") else t)
               for n, t in iter_safetensors(Path(tiny_models["qwen2"]))]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)

    def update(llm):
        assert (llm.engine.in_flight is not None) == llm.engine.runner.async_scheduling
        llm.reset_prefix_cache()
        llm.load_weights(weights)

    runs = []
    for flag in (False, True):
        llm = LLM(tiny_models["qwen2"], async_scheduling=flag, **engine_kwargs(device))
        runs.append(run_engine(llm, prompts(4, seed=8), params, update))
        llm.shutdown()
    assert runs[0] == runs[1]
    assert all(v[2] == [0, 1] for v in runs[1].values())  # 3 tokens on the old weights, the rest on the new


@pytest.mark.parametrize("device", DEVICES)
def test_abort_mid_flight_reports_no_later_token(tiny_model, device):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    batch = prompts(3, seed=9)
    with LLM(tiny_model, async_scheduling=False, **engine_kwargs(device)) as sync_llm:
        want = run_engine(sync_llm, batch, params)
    llm = LLM(tiny_model, async_scheduling=True, **engine_kwargs(device))
    aborted = []

    def abort(llm):
        assert llm.engine.in_flight is not None  # the abort lands between a launch and its apply
        aborted.extend(llm.engine.abort_request("r1"))
        return aborted

    got = run_engine(llm, batch, params, abort)
    tokens, reason, _ = got["r1"]
    assert reason == "abort" and 0 < len(tokens) < 12 and tokens == want["r1"][0][:len(tokens)]
    assert got["r0"] == want["r0"] and got["r2"] == want["r2"]
    assert_no_leak(llm)
    llm.shutdown()


def test_abort_while_an_n1_prompts_first_draw_is_in_flight(tiny_model):
    """The prefill step of n = 1 prompts runs ahead; an abort between its launch and its apply ends the request
    with no token (the draw is dropped), and the others match the synchronous engine's."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    batch = prompts(3, seed=13)
    want = run_engine(LLM(tiny_model, device="cpu", async_scheduling=False), batch, params)
    llm = LLM(tiny_model, device="cpu", async_scheduling=True)

    def abort(llm):
        in_flight = llm.engine.in_flight
        assert in_flight is not None and all(item.seq.is_unforked_parent for item in in_flight[0].scheduled)
        return llm.engine.abort_request("r1")

    got = run_engine(llm, batch, params, abort, at_step=1)
    assert got["r1"][:2] == ([], "abort")
    assert got["r0"] == want["r0"] and got["r2"] == want["r2"]
    assert_no_leak(llm)


def test_tensor_parallel_2(tiny_model):
    """Rank 0 broadcasts the draws it feeds forward; the workers run the same steps (tokens as with tp=1)."""
    batch = prompts(4, seed=10)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=1.0, seed=11, max_tokens=12, n=2)]
    want = [[[c.token_ids for c in r.outputs] for r in LLM(tiny_model, device="cpu").generate(batch, p)]
            for p in params]
    with LLM(tiny_model, device="cpu", tensor_parallel_size=2, async_scheduling=True) as llm:
        assert [[[c.token_ids for c in r.outputs] for r in llm.generate(batch, p)] for p in params] == want


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=1, max_tokens=16, ignore_eos=True, repetition_penalty=1.2,
                   frequency_penalty=0.3, min_tokens=4, logprobs=2),
])
def test_steady_decode_overlaps(tiny_model, monkeypatch, params):
    """The next step is launched before the step in flight is applied: the flag does not fall back for all."""
    llm = LLM(tiny_model, device="cpu", async_scheduling=True)
    events = []
    launch, apply_output = llm.engine.runner.launch, llm.engine.scheduler.apply_output
    # Events hold the step objects themselves: an id() could be reused once a step is gone.
    monkeypatch.setattr(llm.engine.runner, "launch", lambda sched: events.append(("launch", sched)) or launch(sched))
    monkeypatch.setattr(llm.engine.scheduler, "apply_output",
                        lambda sched, *a: events.append(("apply", sched)) or apply_output(sched, *a))
    got = llm.generate(prompts(4, seed=12), params)
    want = LLM(tiny_model, device="cpu").generate(prompts(4, seed=12), params)
    assert outputs(got) == outputs(want)  # penalties: the counts of draws in flight were added on the device

    def at(kind, sched):
        return next(i for i, (k, s) in enumerate(events) if k == kind and s is sched)

    launched = [sched for kind, sched in events if kind == "launch"]
    overlapped = [s for s in launched if at("apply", s) > at("launch", s) + 1]
    assert len(launched) == 16 and len(overlapped) >= 14  # all but the prefill and the last decode step


def test_fallback_rule():
    """The one rule: steps whose draws the host needs before the next step are applied first -- a prompt's first
    draw only when it forks into n > 1 samples."""
    from types import SimpleNamespace as NS

    def seq(n=1, **kw):
        return NS(**{"is_unforked_parent": False, "grammar_state": None, "request": NS(params=NS(n=n)), **kw})

    def sched(seq, prompt_logprobs=None):
        return NS(prompt_logprobs=prompt_logprobs, scheduled=[NS(samples=True, seq=seq)])

    assert not async_step.must_apply_first(sched(seq()))
    assert not async_step.must_apply_first(sched(seq(n=4)))  # a forked sample
    assert async_step.must_apply_first(sched(seq(), prompt_logprobs=[]))
    assert not async_step.must_apply_first(sched(seq(is_unforked_parent=True)))  # n = 1: nothing to fork
    assert async_step.must_apply_first(sched(seq(n=2, is_unforked_parent=True)))
    assert async_step.must_apply_first(sched(seq(grammar_state=object())))


def run_arrivals(llm, arrivals: dict[int, list], max_steps: int = 500) -> dict[str, tuple]:
    """Drive the engine by hand, adding ``arrivals[k]`` -- (request id, prompt, params) -- before its k-th step
    call; returns {request id: (token ids per sample, (finish, stop reason) per sample, top-N ids per sample,
    logprob values per sample)}."""
    engine = llm.engine
    got: dict[str, dict[int, list]] = {}
    for step in range(max_steps):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        if step > max(arrivals) and not engine.has_unfinished():
            break
        for u in engine.step():
            sample = got.setdefault(u.request_id, {}).setdefault(u.index, [[], None, [], []])
            assert sample[1] is None, f"{u.request_id}/{u.index}: an update after it finished"
            sample[0] += u.token_ids
            sample[1] = (u.finish_reason, u.stop_reason) if u.finish_reason else None
            sample[3] += u.sampled_logprobs or []
            if u.top_logprobs is not None:
                sample[2] += u.top_logprobs.ids.tolist()
                sample[3] += u.top_logprobs.logprobs.ravel().tolist()
    assert not engine.has_unfinished()
    assert_no_leak(llm)
    return {rid: tuple(zip(*(samples[i] for i in sorted(samples)))) for rid, samples in got.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", [{}, dict(num_kv_blocks=14, block_size=8), dict(num_scheduler_steps=4)],
                         ids=["roomy", "preempting", "multi-step"])
def test_continuous_arrivals_of_n1_requests_run_ahead_and_match(tiny_model, device, variant, monkeypatch):
    """Requests arriving while others decode (the serving pattern), most with n = 1: the steps that finish their
    prefills run ahead (no fallback: an n = 1 parent is its only sample), one with n = 3 falls back for its fork.
    Tokens, finish and stop reasons (EOS, stop ids, stop strings, length) and logprobs match the synchronous
    engine's, with penalties and top-N logprobs in the mix; with a KV cache small enough to preempt (a sequence
    preempted with its first draw in flight: the scheduler test below); and with multi-step bursts (a first draw
    inside a burst: test_multi_step.py's one-token last chunk). Every finished request is let go
    (assert_no_leak)."""
    rng = random.Random(31)
    kinds = [SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
             SamplingParams(temperature=1.0, seed=5, max_tokens=18, logprobs=0),
             SamplingParams(temperature=1.0, seed=6, max_tokens=16, stop_token_ids=list(range(40, 60)), logprobs=2),
             SamplingParams(temperature=0.9, seed=7, max_tokens=16, stop=["a", "e"]),
             SamplingParams(temperature=1.0, seed=8, max_tokens=12, repetition_penalty=1.3, ignore_eos=True,
                            logprobs=0)]
    arrivals = {}
    shared = [rng.randrange(0, 256) for _ in range(16)]  # one full block (16): later prompts hit it
    for k in range(12):
        step = 3 * k + rng.randrange(3)
        if k % 3 == 2:
            prompt = shared + [k]  # after the first of these: a prefix hit and a one-token last chunk
        else:
            prompt = [rng.randrange(0, 256) for _ in range(rng.randrange(3, 20))]
        arrivals.setdefault(step, []).append((f"r{k}", prompt, kinds[k % len(kinds)]))
    arrivals.setdefault(10, []).append(("fork", [7, 8, 9, 10], SamplingParams(temperature=1.0, seed=9, n=3,
                                                                              max_tokens=10, logprobs=0)))
    results, fell_back = {}, {}
    for flag in (False, True):
        llm = LLM(tiny_model, async_scheduling=flag, **engine_kwargs(device), **variant)
        launch, decisions = llm.engine.runner.launch, []

        def recording_launch(sched, launch=launch, decisions=decisions):
            first_draws = {item.seq.request.request_id for item in sched.scheduled
                           if item.samples and item.seq.is_unforked_parent}
            decisions.append((first_draws, async_step.must_apply_first(sched)))
            return launch(sched)

        monkeypatch.setattr(llm.engine.runner, "launch", recording_launch)
        results[flag] = run_arrivals(llm, arrivals)
        fell_back[flag] = decisions
        if "num_kv_blocks" in variant:
            assert llm.stats()["num_preemptions"] > 0
        llm.shutdown()
    want, got = results[False], results[True]
    assert sorted(got) == sorted(want) and len(want) == 13
    for rid in want:
        assert got[rid][:3] == want[rid][:3], rid  # tokens, finish reasons, top-N ids
        for a, b in zip(got[rid][3], want[rid][3]):
            assert len(a) == len(b) and all(abs(x - y) < 1e-5 for x, y in zip(a, b)), rid
    assert {reason for r in want.values() for reason, _ in r[1]} >= {"stop", "length"}
    first_draw_steps = [(ids, back) for ids, back in fell_back[True] if ids]
    assert any(not back for ids, back in first_draw_steps)  # n = 1 prefills ran ahead
    assert all(back for ids, back in first_draw_steps if "fork" in ids)  # the n = 3 one forked first


def scheduler_driver(s):
    """A scheduler driven by hand with fake draws: launch() schedules and advances a step (as async scheduling's
    launch does), apply(step, tokens) applies one draw per sampling row."""
    from rlserve.engine.scheduler import StepResult

    def launch():
        out = s.schedule()
        s.advance(out)
        return out

    def apply(out, tokens):
        rows = [i if item.samples else -1 for i, item in enumerate(out.scheduled)]
        return s.apply_output(out, StepResult(tokens, rows), weight_version=0)

    return launch, apply


def test_an_n1_prompt_preempted_with_its_first_draw_in_flight_gets_it_and_resumes():
    """The scheduler alone (fake draws): an n = 1 prompt's first draw runs ahead, so the next step may preempt
    that sequence (no block for its first decode) before the draw is applied. The draw still lands -- the
    "fork" of one sample creates nothing and touches no queue -- and the sequence resumes with its prompt and
    that token recomputed, to its max_tokens, every block back at the end."""
    from rlserve.engine.kv_cache import BlockManager
    from rlserve.engine.scheduler import Scheduler
    from rlserve.engine.sequence import Request, SequenceStatus
    s = Scheduler(BlockManager(3, 4), 8, 32, 128, (99,))
    a = Request("a", [1, 2, 3, 4, 5, 6, 7], SamplingParams(max_tokens=2), seed=0)  # 2 blocks, room for one more
    b = Request("b", [1, 2, 3, 4], SamplingParams(max_tokens=3), seed=0)  # 1 full block: its decode needs another
    s.add_request(a)
    s.add_request(b)

    launch, apply = scheduler_driver(s)

    t0 = launch()  # both prefills; neither forks into more samples, so nothing waits for their draws
    assert not async_step.must_apply_first(t0)
    t1 = launch()  # a decodes in its last block; b needs a fourth block: b, the newest, gives way
    assert [item.seq.request.request_id for item in t1.scheduled] == ["a"] and [q.request for q in t1.preempted] == [b]
    apply(t0, [10, 20])  # b's first draw lands on a waiting sequence
    assert b.seqs[0].output_token_ids == [20] and b.seqs[0].status == SequenceStatus.WAITING and b.is_forked
    apply(t1, [11])  # a's second and last token: it finishes and frees its blocks
    for _ in range(10):
        if not s.num_unfinished:
            break
        out = launch()
        apply(out, [21] * len(out.scheduled))
    assert a.seqs[0].output_token_ids == [10, 11] and b.seqs[0].output_token_ids == [20, 21, 21]
    assert not s.num_unfinished
    s.block_manager.check_invariants()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_scheduler_runs_a_pending_draw_ahead_and_drops_a_stopped_ones_extra_token():
    """The scheduler alone (fake draws): a decode with a draw in flight is scheduled again, except when that draw
    is its last by length; a sample that stops on its applied draw drops the extra one, and frees every block."""
    from rlserve.engine.kv_cache import BlockManager
    from rlserve.engine.scheduler import Scheduler
    from rlserve.engine.sequence import Request
    eos = 99
    s = Scheduler(BlockManager(32, 4), 8, 32, 128, (eos,))
    a, b = (Request(rid, [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens), seed=0)
            for rid, max_tokens in (("a", 3), ("b", 8)))
    s.add_request(a)
    s.add_request(b)

    launch, apply = scheduler_driver(s)

    apply(launch(), [7, 7])  # the prefills, applied
    t1 = launch()
    t2 = launch()  # scheduled while t1's draws are in flight
    assert [(item.seq.request.request_id, item.num_new_tokens, item.samples) for item in t2.scheduled] == \
        [("a", 1, True), ("b", 1, True)]
    apply(t1, [7, eos])  # b stops on EOS: its draw in t2 is the extra token
    assert b.seqs[0].output_token_ids == [7, eos] and b.seqs[0] not in s.running
    t3 = launch()  # a's draw in t2 is its third and last: it is not scheduled again
    assert t3.is_empty
    touched = apply(t2, [7, 5])
    assert touched == a.seqs and a.seqs[0].output_token_ids == [7, 7, 7] and b.seqs[0].output_token_ids == [7, eos]
    assert not s.num_unfinished
    s.block_manager.check_invariants()
    assert s.block_manager.num_free_blocks == s.block_manager.num_blocks


def test_unset_it_runs_on_cuda_and_not_on_cpu(tiny_model):
    """vLLM's default: async scheduling is on unless turned off -- where there is a device to overlap with. It is
    resolved from the engine's own device, where the engine runs."""
    from rlserve.config import EngineConfig
    assert EngineConfig(model="m", device="cuda:1").resolved_async_scheduling() is True
    assert EngineConfig(model="m", device="cuda", async_scheduling=False).resolved_async_scheduling() is False
    assert EngineConfig(model="m", device="cpu").resolved_async_scheduling() is False
    assert EngineConfig(model="m", device="cpu", async_scheduling=True).resolved_async_scheduling() is True
    llm = LLM(tiny_model, device="cpu")
    assert llm.config.async_scheduling is None and not llm.engine.runner.async_scheduling
    llm.shutdown()


def test_server_flag_both_spellings(tiny_model):
    import argparse

    from rlserve.cli import add_serve_parser
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    for flag in ("--async_scheduling", "--async-scheduling"):
        assert parser.parse_args(["serve", "m", flag]).async_scheduling is True
    assert parser.parse_args(["serve", "m", "--async_scheduling", "false"]).async_scheduling is False
    assert parser.parse_args(["serve", "m"]).async_scheduling is None  # unset: the engine decides where it runs
    body = {"prompts": [[1, 2, 3], [4, 5]], "max_tokens": 8, "temperature": 0.0, "logprobs": 0}
    want = LLM(tiny_model, device="cpu").generate(body["prompts"], SamplingParams(temperature=0, max_tokens=8))
    with running_server(tiny_model, "--async-scheduling") as server, \
            httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post("/generate/", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["completion_ids"] == [o.outputs[0].token_ids for o in want]
        bad = http.post("/generate/", json={**body, "max_tokens": -1})
        assert bad.status_code == 400
        again = http.post("/generate/", json={**body, "n": 2, "temperature": 1.0})
        assert again.status_code == 200 and len(again.json()["completion_ids"]) == 4


def test_proc_sends_drained_tokens_before_a_later_abort_and_call_result(tiny_model):
    """One poll batch in the engine process: a prefix-cache reset (which applies the step in flight) then an abort
    and a pause(abort). On the wire the drained tokens come first, then the call's result, then the finished
    updates: never a sample's tokens after its end, nor after the call that applied them returned."""
    import zmq

    from rlserve.config import EngineConfig
    from rlserve.engine import messages as msg
    from rlserve.engine.core_proc import EngineCoreProc
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    out_port = pull.bind_to_random_port("tcp://127.0.0.1")
    in_port = push.bind_to_random_port("tcp://127.0.0.1")
    proc = EngineCoreProc(EngineConfig(model=tiny_model, device="cpu", seed=0, async_scheduling=True), 0,
                          f"tcp://127.0.0.1:{in_port}", f"tcp://127.0.0.1:{out_port}", 0)
    try:
        assert isinstance(pull.recv_pyobj(), msg.EngineReady)
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
        batch = prompts(2, seed=14)
        for i, p in enumerate(batch):
            proc.handle(msg.AddRequests([msg.AddRequest(f"r{i}", p, params, stream=True)]))
        sent = []
        for _ in range(4):
            proc.step()
        assert proc.engine.in_flight is not None  # the batch below lands between a launch and its apply
        # Everything the steps sent, up to a ping's answer (one socket keeps order; a ping leaves the step in
        # flight): polling with no wait would miss messages still in the TCP pipe on a loaded machine.
        proc.handle(msg.UtilityCall(0, msg.Ping()))
        while not (sent and isinstance(sent[-1], msg.UtilityResult) and sent[-1].call_id == 0):
            assert pull.poll(10_000), "the ping's answer never came"
            sent.append(pull.recv_pyobj())
        assert proc.engine.in_flight is not None
        mark = len(sent)
        proc.handle(msg.UtilityCall(1, msg.ResetPrefixCache()))
        proc.handle(msg.AbortRequests(["r0"]))
        proc.handle(msg.UtilityCall(2, msg.Pause(mode="abort")))
        for _ in range(10):  # up to the pause's answer, the last message expected; then nothing more may come
            assert pull.poll(10_000), "the pause's answer never came"
            sent.append(pull.recv_pyobj())
            if isinstance(sent[-1], msg.UtilityResult) and sent[-1].call_id == 2:
                break
        assert not pull.poll(200)
        tail = [(type(m).__name__, [(u.request_id, len(u.token_ids), u.finish_reason) for u in m.updates]
                 if isinstance(m, msg.StepOutputs) else m.call_id) for m in sent[mark:]]
        assert tail == [("StepOutputs", [("r0", 1, None), ("r1", 1, None)]), ("UtilityResult", 1),
                        ("StepOutputs", [("r0", 0, "abort")]), ("StepOutputs", [("r1", 0, "abort")]),
                        ("UtilityResult", 2)], tail
        got = {}
        for m in sent:
            for u in getattr(m, "updates", []):
                got[u.request_id] = got.get(u.request_id, []) + u.token_ids
        want = LLM(tiny_model, device="cpu").generate(batch, SamplingParams(temperature=0, max_tokens=4,
                                                                             ignore_eos=True))
        assert [got["r0"], got["r1"]] == [r.outputs[0].token_ids for r in want]
    finally:
        proc.close()
        pull.close(0)
        push.close(0)
        ctx.term()


def test_failed_launch_keeps_the_step_in_flight(tiny_model, monkeypatch):
    """An exception in a launch goes up as in sync mode, and the step that was in flight is not lost: its tokens
    are applied (``take_drained``), as sync mode had returned them by then. The engine then runs on as sync does."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    batch = prompts(3, seed=15)
    runs = []
    for flag in (False, True):
        llm = LLM(tiny_model, device="cpu", async_scheduling=flag)
        engine, launch = llm.engine, llm.engine.runner.launch
        for i, p in enumerate(batch):
            engine.add_request(f"r{i}", p, params, stream=True)
        got: dict[str, list] = {}

        def take(updates):
            for u in updates:
                got[u.request_id] = got.get(u.request_id, []) + u.token_ids

        for _ in range(4):
            take(engine.step())
        assert (engine.in_flight is not None) == flag

        def fail(sched):
            raise RuntimeError("injected")

        monkeypatch.setattr(engine.runner, "launch", fail)
        with pytest.raises(RuntimeError, match="injected"):
            engine.step()
        assert engine.in_flight is None
        take(engine.take_drained())
        at_failure = {k: list(v) for k, v in got.items()}
        monkeypatch.setattr(engine.runner, "launch", launch)
        for _ in range(100):  # bounded: a lost step in flight leaves a draw pending for good
            if not engine.has_unfinished():
                break
            take(engine.step())
        assert not engine.has_unfinished()
        assert_no_leak(llm)
        runs.append((at_failure, got))
    assert runs[0] == runs[1]
    assert all(len(v) == 4 for v in runs[0][0].values())  # streamed: 4 steps' tokens, none lost


def test_fallback_steps_build_their_sampling_batch_on_the_device(tiny_model, monkeypatch):
    """Async scheduling on CUDA (simulated: the host path's flag forced on a CPU runner): a step that runs ahead
    builds its sampling batch on the host and moves it pinned; a guided (fallback) step builds it on the device,
    its allowed-token mask never unpacked on the host. Penalties go through the runner's upload."""
    from rlserve.engine import runner as runner_module
    llm = LLM(tiny_model, device="cpu", async_scheduling=True)
    runner = llm.engine.runner
    assert runner.penalties.upload is not None  # the runner's _upload, through a weak proxy (no cycle)
    assert LLM(tiny_model, device="cpu").engine.runner.penalties.upload is None  # sync mode: the old copy
    runner._uploads_ahead = True
    uploads = []

    def upload(values, dtype=torch.int64):  # _upload's pinned copy, without CUDA
        uploads.append(len(values))
        return torch.tensor(values, dtype=dtype)

    monkeypatch.setattr(runner, "_upload", upload)  # the penalty state's hook reaches it through the runner
    calls = []
    prepare = runner_module.prepare_sampling

    def prepare_sampling(items, vocab_size, eos, device, penalties=None):
        calls.append([any(item.seq.grammar_state is not None for item in items), device is runner._host, False])
        return prepare(items, vocab_size, eos, device, penalties)

    def batch_to_device(batch, device):
        calls[-1][2] = True
        return batch

    monkeypatch.setattr(runner_module, "prepare_sampling", prepare_sampling)
    monkeypatch.setattr(runner_module, "batch_to_device", batch_to_device)
    batch = prompts(4, seed=16)
    llm.generate(batch, SamplingParams(temperature=1.0, seed=1, max_tokens=8, structured_outputs={"regex": "[a-c]{3,8}"}))
    llm.generate(batch, SamplingParams(temperature=1.0, seed=2, max_tokens=8, ignore_eos=True, repetition_penalty=1.2))
    assert any(guided for guided, _, _ in calls) and any(not guided for guided, _, _ in calls)
    assert all(not on_host and not moved for guided, on_host, moved in calls if guided)
    assert any(on_host and moved for guided, on_host, moved in calls if not guided)
    assert len(uploads) >= 8  # the penalised steps' counts went through it
