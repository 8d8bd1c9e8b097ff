"""A replica sends a running non-streamed sample's new tokens every ``EngineCore.partial_output_interval_s``
(``core_proc.PARTIAL_OUTPUT_INTERVAL_S``), not only when it finishes: the front end must put together exactly
what one message per sample gives. Interval 0 sends at every step, the most pieces a sample can come in; the
reference engine (no interval: one message per sample, as an offline ``LLM``) runs the same seeded batches, and
token ids, finish and stop reasons, text, weight versions, cached tokens, every logprob and top-N entry, and prompt
logprobs must be identical. Each case also counts the updates of unfinished non-streamed samples, so that the test
fails if the interval stops sending any."""

from __future__ import annotations

import pytest

from rlserve import LLM, SamplingParams
from rlserve.engine.output_processor import OutputProcessor
from test_async_scheduling import early_stop_cases, outputs, prompts


@pytest.fixture(scope="module", params=[dict(), dict(num_scheduler_steps=4, async_scheduling=True)],
                ids=["k1", "k4_async"])
def engines(request, tiny_model):
    reference = LLM(tiny_model, device="cpu", **request.param)
    pieces = LLM(tiny_model, device="cpu", **request.param)
    pieces.engine.partial_output_interval_s = 0.0
    return reference, pieces


def prompt_logprobs(result) -> list | None:
    pl = result.prompt_logprobs
    return None if pl is None else [pl[p] for p in range(len(pl))]


CASES = [
    (prompts(seed=4), SamplingParams(temperature=1.0, n=3, max_tokens=24, logprobs=2, seed=5)),  # top-N pieces
    (prompts(seed=5), SamplingParams(temperature=1.0, max_tokens=20, logprobs=0, prompt_logprobs=2, seed=6)),
    (prompts(seed=6), SamplingParams(temperature=0.0, max_tokens=17, logprobs=None)),
] + [(batch, params) for batch, params, _ in early_stop_cases()]  # EOS, stop ids and stop strings mid-run


@pytest.mark.parametrize("case", range(len(CASES)))
def test_samples_sent_in_pieces_equal_samples_sent_once(engines, case):
    reference, pieces = engines
    batch, params = CASES[case]
    before = pieces.engine.num_partial_updates
    want, got = reference.generate(batch, params), pieces.generate(batch, params)
    assert outputs(got) == outputs(want)
    assert [prompt_logprobs(r) for r in got] == [prompt_logprobs(r) for r in want]
    assert pieces.engine.num_partial_updates > before + len(batch)  # several pieces a sample
    assert reference.engine.num_partial_updates == 0
    assert not pieces.engine.requests and not pieces.engine.has_unfinished()


def run_by_hand(llm: LLM, batch, params, abort: str, abort_at: int) -> dict:
    """The engine driven as a replica drives it, its updates gathered as the API server does; request ``abort``
    aborted before step ``abort_at``. Returns {request id: (token ids, finish reasons, logprobs) of its samples}."""
    engine = llm.engine
    processor = OutputProcessor(llm.tokenizer)
    for i, prompt in enumerate(batch):
        processor.add_request(f"r{i}", None, prompt, params, detokenize=False)
        engine.add_request(f"r{i}", prompt, params)
    done = {}
    for step in range(10_000):
        updates = engine.abort_request(abort) if step == abort_at else []
        if not engine.has_unfinished():
            assert not updates
            break
        for update in updates + engine.step():
            state = processor.process(update)
            if state is not None:
                done[state.request_id] = [(c.token_ids, c.finish_reason, c.sampled_logprobs)
                                          for c in state.to_output().outputs]
    assert len(done) == len(batch)
    return done


@pytest.mark.parametrize("abort_at", [1, 9])
def test_an_abort_after_pieces_gives_what_the_sample_made(engines, abort_at):
    """Aborted after some pieces went out: its samples end with what they made, as with one message each."""
    reference, pieces = engines
    params = SamplingParams(temperature=1.0, n=2, max_tokens=30, logprobs=0, seed=11)
    batch = prompts(n=4, seed=8)
    want, got = (run_by_hand(llm, batch, params, "r1", abort_at) for llm in (reference, pieces))
    assert got == want
    assert {reason for _, reason, _ in got["r1"]} == {"abort"} and len(got["r1"][0][0]) < 30


def test_preempted_samples_sent_in_pieces_equal_samples_sent_once(tiny_model):
    """A KV cache too small for the batch: samples are preempted and recomputed between their pieces."""
    params = SamplingParams(temperature=1.0, n=3, max_tokens=40, logprobs=1, seed=2, ignore_eos=True)
    batch = prompts(n=6, seed=9)
    reference = LLM(tiny_model, device="cpu", num_kv_blocks=12)
    pieces = LLM(tiny_model, device="cpu", num_kv_blocks=12)
    pieces.engine.partial_output_interval_s = 0.0
    want, got = reference.generate(batch, params), pieces.generate(batch, params)
    assert pieces.engine.scheduler.num_preemptions > 0
    assert outputs(got) == outputs(want) and pieces.engine.num_partial_updates > 0


def test_pieces_go_out_once_per_interval_counted_from_when_work_arrives(llm, monkeypatch):
    """The interval's clock, patched: an idle engine's first step does not send (the clock restarts when work
    arrives); then one send per interval, not per step."""
    from types import SimpleNamespace

    from rlserve.engine import core
    clock = [1000.0]
    monkeypatch.setattr(core, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # core's clock only
    engine = llm.engine
    monkeypatch.setattr(engine, "partial_output_interval_s", 10.0)
    clock[0] += 60  # idle for six intervals
    params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=0, ignore_eos=True)
    start = engine.num_partial_updates
    engine.add_request("clock", [1, 2, 3], params)
    sent = []
    for step in range(12):
        clock[0] += 4 if step else 0  # the first step at the time the request came; 4 s a step after
        updates = engine.step()
        sent.append(engine.num_partial_updates - start)
        if not engine.has_unfinished():
            break
    # steps at t = 0, 4, 8, 12 (due: 12 >= 10), 16, 20, 24 (due), 28 ...
    assert sent[:8] == [0, 0, 0, 1, 1, 1, 2, 2], sent
    assert updates and updates[-1].finish_reason == "length" and len(updates[-1].token_ids) < 12


def test_a_server_answer_sent_in_pieces_equals_the_offline_engine(tiny_model, llm):
    """Through a real server whose replica sends at every step ($RLSERVE_PARTIAL_OUTPUT_INTERVAL_S=0): the API
    process puts the pieces together into the offline engine's greedy tokens, for JSON and binary answers; the
    replica's stats count the pieces; a normal request after."""
    import time

    import httpx

    from rlserve.server import binary
    from server_utils import running_server
    batch = prompts(n=6, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=0)
    want = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    with running_server(tiny_model, env={"RLSERVE_PARTIAL_OUTPUT_INTERVAL_S": "0"}) as server, \
            httpx.Client(base_url=server.url, timeout=120) as http:
        body = {"prompts": batch, "max_tokens": 40, "temperature": 0.0, "logprobs": 0,
                "generation_kwargs": {"ignore_eos": True}}
        as_json = http.post("/generate/", json=body)
        as_binary = http.post("/generate/", json=dict(body, response_format="binary"))
        assert as_json.status_code == as_binary.status_code == 200, (as_json.text, as_binary.text)
        answer = as_json.json()
        assert answer["completion_ids"] == want == binary.decode(as_binary.json())["completion_ids"]
        assert [len(lps) for lps in answer["logprobs"]] == [40] * len(batch)
        deadline = time.monotonic() + 10  # the replica's stats arrive every 0.25 s
        while http.get("/server_info/").json()["replicas"][0]["num_partial_updates"] < 2 * 39 * len(batch):
            assert time.monotonic() < deadline, "the replica did not send each step's tokens"
            time.sleep(0.1)
        ok = http.post("/generate/", json={"prompts": [[1, 2, 3]], "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["completion_ids"][0]) == 3
