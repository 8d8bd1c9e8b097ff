"""Correctness under every valid input (issue 14), on the offline engine: a large ``n`` runs in parts, request
seeds are independent per replica and per start, one-token prompt chunks among decodes on the CUDA-graph
branch, a grammar that allows only EOS against ``min_tokens``, an error in one request's step fails that
request only, and one draw rule per row (a seeded row's tokens do not depend on its neighbours)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_no_leak
from rlserve import LLM, SamplingParams
from rlserve.engine.core import request_seed_generator
from rlserve.engine.runner import ModelRunner, _gumbel_sampler
from rlserve.engine.sampling_batch import prepare_sampling
from rlserve.engine.scheduler import ScheduledSeq
from rlserve.engine.sequence import Request, Sequence

PROMPTS = [[5, 6, 7], list(range(40, 75)), [200, 100, 50, 25], list(range(1, 20))]


def tokens(outputs):
    return [[c.token_ids for c in o.outputs] for o in outputs]


# -- item 1: n larger than max_num_seqs ---------------------------------------------------------------------
def test_n_beyond_max_num_seqs_is_served_in_parts(tiny_model, llm):
    """n = 20 on an engine that runs 4 sequences (4 block-table rows; the old engine died with "no free
    block-table row"): every sample is served, each with the tokens an engine running them all at once gives."""
    params = SamplingParams(n=20, temperature=1.0, seed=11, max_tokens=6, min_tokens=6, logprobs=2)
    small = LLM(tiny_model, device="cpu", max_num_seqs=4)
    got = small.generate(PROMPTS[:2], params)
    assert [len(o.outputs) for o in got] == [20, 20]
    assert tokens(got) == tokens(llm.generate(PROMPTS[:2], params))
    assert small.stats()["num_running"] == 0 and small.engine.runner.num_rows == 4
    assert_no_leak(small)
    assert len(small.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) >= 1


# -- item 2: independent request seeds ----------------------------------------------------------------------
def test_request_seeds_are_independent_per_replica_and_start_unless_fixed():
    def draws(seed, rank):
        rng = request_seed_generator(seed, rank)
        return [rng.getrandbits(63) for _ in range(4)]

    assert draws(None, 0) != draws(None, 0)  # two starts without --seed: independent
    assert draws(None, 0) != draws(None, 1)
    assert draws(7, 0) == draws(7, 0) and draws(7, 1) == draws(7, 1)  # --seed 7: reproducible ...
    assert draws(7, 0) != draws(7, 1)  # ... and each replica has its own stream


def test_unseeded_requests_differ_between_replicas_with_the_same_seed(tiny_model):
    params = SamplingParams(temperature=1.0, max_tokens=12, min_tokens=12)
    outs = [tokens(LLM(tiny_model, device="cpu", seed=3, data_parallel_rank=rank).generate(PROMPTS, params))
            for rank in (0, 1, 1)]
    assert outs[1] == outs[2] and outs[0] != outs[1]


# -- item 3: a one-token prompt chunk among the decodes of a CUDA-graph step ----------------------------------
class EagerDecodeGraphs:
    """Stands in for ``DecodeGraphs`` on CPU: the same call, the model run eagerly on the decode batch, so
    that the runner's graph branch runs here."""

    def __init__(self, model, max_batch: int):
        self.model, self.max_batch, self.num_runs = model, max_batch, 0

    def run(self, input_ids, positions, meta):
        self.num_runs += 1
        return self.model(input_ids, positions, meta)


def record_cut_chunks(runner) -> list:
    """Wrap the runner's forward; the returned list collects the steps of decodes plus a prompt chunk that draws
    nothing (a one-token chunk cut by the token budget)."""
    cut_chunks, forward = [], runner.forward

    def recording_forward(step):
        if step.num_decodes == len(step.query_lens) and len(step.sample_rows) < len(step.query_lens):
            cut_chunks.append(step)
        return forward(step)

    runner.forward = recording_forward
    return cut_chunks


def test_one_token_prompt_chunk_among_decodes_on_the_graph_branch(tiny_model):
    """A token budget of max_num_seqs cuts a prompt to one token inside a decode step: that row runs in
    the graph batch but draws nothing (the old runner returned one logit row too many)."""
    config = dict(device="cpu", max_num_seqs=4, max_num_batched_tokens=4)
    batch = [[5], [6], [7], [9] * 30, [3, 1, 4, 1, 5]]  # three decode while the fourth prompt goes 1 by 1
    params = [SamplingParams(temperature=0, max_tokens=10, min_tokens=10),
              SamplingParams(temperature=1.0, seed=5, top_p=0.9, max_tokens=10, min_tokens=10, logprobs=0),
              SamplingParams(temperature=1.0, seed=5, n=2, max_tokens=10, min_tokens=10, logprobs=0)]
    want = [tokens(LLM(tiny_model, **config).generate(batch, p)) for p in params]
    llm = LLM(tiny_model, **config)
    runner = llm.engine.runner
    runner.graphs = EagerDecodeGraphs(runner.model, 4)
    cut_chunks = record_cut_chunks(runner)
    assert [tokens(llm.generate(batch, p)) for p in params] == want
    assert cut_chunks and runner.graphs.num_runs > 0  # the situation was reached, on the graph branch
    assert_no_leak(llm)


# -- item 4: a grammar that allows only EOS against min_tokens ----------------------------------------------
@pytest.mark.parametrize("spec", [{"regex": ""}, {"choice": [""]}])
def test_grammar_allowing_only_eos_wins_over_min_tokens(llm, spec):
    """min_tokens bans EOS, the grammar allows nothing else: the grammar wins (EOS, finish reason "stop") and
    the logprob is finite, never a NaN draw over an all -inf row."""
    params = SamplingParams(temperature=1.0, seed=2, max_tokens=8, min_tokens=3, logprobs=0, n=2,
                            structured_outputs=spec)
    for out in llm.generate(PROMPTS[:2], params):
        for c in out.outputs:
            assert c.finish_reason == "stop" and c.token_ids in ([t] for t in llm.info.eos_token_ids), c
            assert all(math.isfinite(lp) for lp in c.sampled_logprobs)
    guided = llm.generate(PROMPTS[:1], params.clone(structured_outputs={"regex": "[a-c]{5}"}))[0]
    assert all(len(c.token_ids) == 5 for c in guided.outputs)  # min_tokens still bans EOS when it can
    assert_no_leak(llm)


# -- item 8 (the engine's part): an error in one request's step fails that request only ------------------------
FAULTS = ["grammar_accept", "grammar_mask", "sampling_params", "stop_strings"]


def inject(monkeypatch, fault: str):
    """Make the engine fail for requests marked as ``bad_params`` below, and nowhere else."""
    from rlserve.engine import sampling_batch, stop_strings, structured

    if fault == "grammar_accept":
        accept = structured.GrammarState.accept

        def failing_accept(self, token_id):
            if self.grammar.spec.value == "x+" and self.num_tokens >= 2:
                raise RuntimeError("injected grammar fault")
            return accept(self, token_id)
        monkeypatch.setattr(structured.GrammarState, "accept", failing_accept)
    elif fault == "grammar_mask":
        new_state = structured.CompiledGrammar.new_state

        class FailingMatcher:
            def __init__(self, matcher):
                self.matcher = matcher

            def unsafe_compute_mask_ptr(self, *args):
                raise RuntimeError("injected mask fault")

            def deep_copy(self):
                return FailingMatcher(self.matcher.deep_copy())

            def __getattr__(self, name):
                return getattr(self.matcher, name)

        def failing_new_state(self):
            state = new_state(self)
            if self.spec.value == "x+":
                state._matcher = FailingMatcher(state._matcher)
            return state
        monkeypatch.setattr(structured.CompiledGrammar, "new_state", failing_new_state)
    elif fault == "sampling_params":
        class FailingRow(sampling_batch._RequestRow):
            def __init__(self, params, *args):
                if params.top_k == 7:
                    raise RuntimeError("injected sampling fault")
                super().__init__(params, *args)
        monkeypatch.setattr(sampling_batch, "_RequestRow", FailingRow)
    else:
        add = stop_strings.StopState.add

        def failing_add(self, token_id, can_stop):  # detokenizing a sample in the engine fails
            if "\x01" in self.stops:
                raise RuntimeError("injected stop-string fault")
            return add(self, token_id, can_stop)
        monkeypatch.setattr(stop_strings.StopState, "add", failing_add)


def bad_params(fault: str) -> SamplingParams:
    base = SamplingParams(temperature=1.0, seed=9, n=3, max_tokens=8, min_tokens=8)
    if fault.startswith("grammar"):
        return base.clone(structured_outputs={"regex": "x+"})
    if fault == "sampling_params":
        return base.clone(top_k=7)
    return base.clone(stop=["\x01"])


@pytest.mark.parametrize("fault", FAULTS)
def test_an_error_in_one_requests_step_fails_that_request_only(llm, monkeypatch, fault):
    good = [SamplingParams(temperature=1.0, seed=4, n=2, max_tokens=8, min_tokens=8),
            SamplingParams(temperature=0, max_tokens=8, min_tokens=8, structured_outputs={"regex": "[ab]+"})]
    want = tokens(llm.generate(PROMPTS[:2], good))
    inject(monkeypatch, fault)
    outs = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [good[0], bad_params(fault), good[1]])
    assert tokens([outs[0], outs[2]]) == want  # the others are untouched
    failed = outs[1].outputs
    assert len(failed) == 3 and all(c.finish_reason == "error" for c in failed), failed
    assert all("injected" in c.stop_reason for c in failed), [c.stop_reason for c in failed]
    assert_no_leak(llm)
    monkeypatch.undo()
    assert tokens(llm.generate(PROMPTS[:2], good)) == want  # and the engine still serves


# -- item 1 of the review: one draw rule per row ------------------------------------------------------------------
def sampling_batch_of(params: list[SamplingParams], vocab: int, device: str):
    """The real ``prepare_sampling`` batch of decoding sequences (prompt [1, 2, 3], four output tokens)."""
    items = []
    for i, p in enumerate(params):
        request = Request(str(i), [1, 2, 3], p, seed=p.seed if p.seed is not None else 1000 + i)
        request.is_forked = True
        seq = Sequence(request, 0, [1, 2, 3, 10, 11, 10, 12])
        seq.num_computed_tokens = len(seq.token_ids) - 1
        request.seqs = [seq]
        items.append(ScheduledSeq(seq, 1))
    return prepare_sampling(items, vocab, (0,), torch.device(device))


NEIGHBOURS = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.0, top_p=0.8),
              SamplingParams(temperature=1.0, min_p=0.3), SamplingParams(repetition_penalty=1.5),
              SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), SamplingParams(top_k=5),
              SamplingParams(logprobs=5), SamplingParams(logprobs=2, logprobs_mode="raw"),
              SamplingParams(temperature=0), SamplingParams(min_tokens=10)]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_seeded_rows_draw_does_not_depend_on_its_neighbours(device):
    """The same logits row with the same seed draws the same token alone and beside rows that need top-p,
    min-p, top-k, penalties, top-N or raw logprobs, min_tokens or greedy: on CUDA every row goes through
    the Gumbel-max kernel (before, such a neighbour switched the whole step to the inverse-CDF draw)."""
    vocab = 3000
    sampler = SimpleNamespace(gumbel_sample=_gumbel_sampler(torch.device(device)))
    assert (sampler.gumbel_sample is not None) == (device == "cuda")
    gen = torch.Generator().manual_seed(0)
    base = (torch.randn(1, vocab, generator=gen) * 3).to(device)
    for seed in range(40):
        target = SamplingParams(temperature=0.9, seed=seed)
        alone = ModelRunner._sample_rows(sampler, base.clone(), sampling_batch_of([target], vocab, device))
        for k in range(len(NEIGHBOURS)):
            mix = NEIGHBOURS[k:] + NEIGHBOURS[:k]
            params = mix[:k % 4] + [target] + mix[k % 4:]
            logits = (torch.randn(len(params), vocab, generator=gen) * 3).to(device)
            logits[k % 4] = base[0]
            out = ModelRunner._sample_rows(sampler, logits, sampling_batch_of(params, vocab, device))
            assert int(out.token_ids[k % 4]) == int(alone.token_ids[0]), (seed, k)


def engine_tokens(llm, target: SamplingParams, neighbours: list[SamplingParams]):
    batch = [PROMPTS[1]] + [PROMPTS[0], PROMPTS[2], PROMPTS[3], [7] * 9][:len(neighbours)]
    return tokens(llm.generate(batch, [target] + neighbours))[0]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_seeded_request_draws_the_same_tokens_beside_any_neighbours(tiny_model, device):
    """End to end, with the batch's shapes held equal (so that the logits are too): a seeded request next to
    plain seeded neighbours, then next to neighbours that need top-p, min-p, penalties and top-N logprobs."""
    llm = LLM(tiny_model, device=device, dtype="float32", gpu_memory_utilization=0.2)
    fixed = dict(max_tokens=24, min_tokens=24, ignore_eos=True)
    target = SamplingParams(temperature=0.9, seed=1234, n=2, logprobs=0, **fixed)
    plain = [SamplingParams(temperature=1.0, seed=s, **fixed) for s in range(4)]
    special = [SamplingParams(temperature=1.0, seed=0, top_p=0.7, **fixed),
               SamplingParams(temperature=1.0, seed=1, min_p=0.2, **fixed),
               SamplingParams(temperature=1.0, seed=2, repetition_penalty=1.4, frequency_penalty=0.5, **fixed),
               SamplingParams(temperature=1.0, seed=3, logprobs=5, **fixed)]
    want = engine_tokens(llm, target, plain)
    assert engine_tokens(llm, target, special) == want
    assert want[0] != want[1]  # two samples of one request differ
    assert_no_leak(llm)
    llm.shutdown()  # on CUDA its memory goes now, for the next test's engine


FAULTY_GRAMMAR = '''
from rlserve.engine import structured

_accept = structured.GrammarState.accept


def _failing_accept(self, token_id):
    if self.grammar.spec.value == "x+" and self.num_tokens >= 2:
        raise RuntimeError("injected grammar fault")
    return _accept(self, token_id)


structured.GrammarState.accept = _failing_accept
'''


def test_http_a_sample_failing_in_the_engine_fails_its_request_only_with_500(tiny_model, tmp_path):
    """A server whose grammar code raises for one spec (injected at interpreter start through
    sitecustomize, in the API server and in the engine processes; no hook in rlserve): that request gets a
    500 naming the error, a concurrent request is served, no KV block stays held, and the server serves on."""
    import os
    import time
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from server_utils import running_server

    (tmp_path / "sitecustomize.py").write_text(FAULTY_GRAMMAR)
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    good = dict(prompts=[[1, 2, 3]], n=2, max_tokens=30, temperature=1.0, generation_kwargs={"ignore_eos": True})
    bad = dict(prompts=[[4, 5]], n=3, max_tokens=30,  # min_tokens: past the second token, where the fault is
               generation_kwargs={"structured_outputs": {"regex": "x+"}, "min_tokens": 5})
    with running_server(tiny_model, env={"PYTHONPATH": path}) as server, \
            httpx.Client(base_url=server.url, timeout=60) as http, ThreadPoolExecutor(2) as pool:
        running = pool.submit(http.post, "/generate/", json=good)
        failed = http.post("/generate/", json=bad)
        assert failed.status_code == 500 and "injected grammar fault" in failed.json()["error"]["message"]
        ok = running.result(60)
        assert ok.status_code == 200 and [len(c) for c in ok.json()["completion_ids"]] == [30, 30]
        deadline = time.monotonic() + 30
        while True:
            replica = http.get("/server_info/").json()["replicas"][0]
            if replica["kv_blocks_free"] == replica["kv_blocks_total"] and replica["num_running"] == 0:
                break
            assert time.monotonic() < deadline, replica
            time.sleep(0.1)
        again = http.post("/generate/", json=dict(prompts=["ok"], max_tokens=2, temperature=0))
        assert again.status_code == 200 and http.get("/health/").status_code == 200


# -- item 5 of the review: memory ------------------------------------------------------------------------------
def test_rotary_table_is_built_once_at_max_model_len(tiny_model):
    llm = LLM(tiny_model, device="cpu", max_model_len=96)
    model = llm.engine.runner.model
    tables = {id(layer.self_attn.rotary_emb) for layer in model.model.layers}
    assert tables == {id(model.model.rotary_emb)}  # one module shared by every layer
    assert model.model.rotary_emb.cos.shape[0] == 96  # not max_position_embeddings (2048)
    assert sum(1 for _ in model.buffers()) == 2  # cos and sin, once
    out = llm.generate([list(range(80))], SamplingParams(temperature=0, max_tokens=16, min_tokens=16))[0]
    assert len(out.outputs[0].token_ids) == 16  # positions up to 95 read the table


def test_the_memory_profiles_sampler_batch_runs_every_stage():
    """The batch the CUDA memory profile samples (so that the KV cache leaves room for the sampler's peak)
    goes through every stage and draws from the logits rows it gathers."""
    from rlserve.engine.sampler import sample, worst_case_batch
    batch = worst_case_batch(6, 2, 300, 20, torch.device("cpu"))
    assert all(getattr(batch, name) is not None for name in (
        "top_k", "top_p", "min_p", "repetition_penalty", "output_counts", "seen", "banned",
        "allowed_mask", "raw_logprob_rows"))
    out = sample(torch.randn(2, 300), batch)
    assert out.token_ids.shape == (6,) and out.top_ids.shape == (6, 20)
    assert bool((out.token_ids != 0).all())  # token 0 is banned (min_tokens) on every row


# -- on CUDA: the graph branch with one-token chunks, and the memory profile -----------------------------------
@pytest.mark.gpu
def test_one_token_prompt_chunk_among_decodes_in_a_real_cuda_graph(tiny_model):
    """max_num_batched_tokens == max_num_seqs on CUDA: steps of decodes plus a one-token prompt chunk replay a
    captured graph; the tokens equal those of the eager engine."""
    config = dict(device="cuda", dtype="float32", max_num_seqs=4, max_num_batched_tokens=4,
                  gpu_memory_utilization=0.2)
    batch = [[5], [6], [7], [9] * 30, [3, 1, 4, 1, 5]]
    params = [SamplingParams(temperature=0, max_tokens=10, min_tokens=10),
              SamplingParams(temperature=1.0, seed=5, top_p=0.9, max_tokens=10, min_tokens=10, logprobs=0),
              SamplingParams(temperature=1.0, seed=5, max_tokens=10, min_tokens=10, logprobs=0)]
    eager = LLM(tiny_model, enforce_eager=True, **config)
    want = [tokens(eager.generate(batch, p)) for p in params]
    eager.shutdown()  # its KV cache goes now, not when the garbage collector finds it
    llm = LLM(tiny_model, **config)
    runner = llm.engine.runner
    assert runner.graphs is not None
    cut_chunks = record_cut_chunks(runner)
    assert [tokens(llm.generate(batch, p)) for p in params] == want
    assert cut_chunks
    assert_no_leak(llm)


@pytest.mark.gpu
def test_the_memory_profile_covers_the_samplers_peak(tmp_path):
    """The profiled peak (forward + logits + the sampler with every stage on max_num_seqs rows) is at least
    what the sampler alone takes on its worst batch, so the KV cache leaves room for it. A Qwen-sized
    vocabulary on a tiny network: the sampler's [rows, vocab] tensors dominate."""
    from rlserve.engine.sampler import worst_case_batch
    from rlserve.models.tiny import make_tiny_model
    model = make_tiny_model(tmp_path / "big-vocab", "qwen2", seed=1, vocab_size=151936)
    llm = LLM(str(model), device="cuda", dtype="bfloat16", max_num_seqs=256, gpu_memory_utilization=0.3)
    runner = llm.engine.runner
    assert runner.profiled_peak_bytes is not None and runner.profiled_peak_bytes > 0
    rows, vocab = 256, llm.info.vocab_size
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    batch = worst_case_batch(rows, rows, vocab, llm.engine.config.max_logprobs, torch.device("cuda"))
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = runner._sample(logits, batch)
    torch.cuda.synchronize()
    sampler_peak = torch.cuda.max_memory_allocated() - base
    assert out.token_ids.shape == (rows,)
    assert sampler_peak <= runner.profiled_peak_bytes, (sampler_peak, runner.profiled_peak_bytes)


# -- item 6 of the review: penalty state built on the device from token ids ----------------------------------
def test_penalty_counts_and_seen_mask_are_built_from_token_ids():
    """The penalised rows' counts and seen mask, built where the logits are from the ids alone (no dense host
    tensor), equal the dense reference; rows without penalties get no slot."""
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(), SamplingParams(frequency_penalty=0.5)]
    batch = sampling_batch_of(params, 50, "cpu")  # prompt [1, 2, 3], outputs [10, 11, 10, 12]
    assert batch.penalty_rows.tolist() == [0, 2]
    counts = torch.zeros(2, 50, dtype=torch.int32)
    for t in (10, 11, 10, 12):
        counts[:, t] += 1
    seen = counts > 0
    seen[:, [1, 2, 3]] = True
    slots = batch.penalty_slots
    assert torch.equal(batch.output_counts[slots], counts) and torch.equal(batch.seen[slots], seen)
