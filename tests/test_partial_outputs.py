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
from test_async_scheduling import early_stop_cases, outputs, prompts


def count_partial_updates(llm: LLM) -> list[int]:
    """Wraps the engine's ``_update``: counts updates of samples that are neither streamed nor finished."""
    engine, count = llm.engine, [0]
    update = engine._update

    def counted(seq):
        if not seq.request.stream and not seq.status.is_finished:
            count[0] += 1
        return update(seq)
    engine._update = counted
    return count


def prompt_logprobs(result) -> list | None:
    pl = result.prompt_logprobs
    return None if pl is None else [pl[p] for p in range(len(pl))]


@pytest.fixture(scope="module", params=[dict(), dict(num_scheduler_steps=4, async_scheduling=True)],
                ids=["k1", "k4_async"])
def engines(request, tiny_model):
    reference = LLM(tiny_model, device="cpu", **request.param)
    pieces = LLM(tiny_model, device="cpu", **request.param)
    pieces.engine.partial_output_interval_s = 0.0
    return reference, pieces, count_partial_updates(pieces), count_partial_updates(reference)


CASES = [
    (prompts(seed=4), SamplingParams(temperature=1.0, n=3, max_tokens=24, logprobs=2, seed=5)),  # top-N pieces
    (prompts(seed=5), SamplingParams(temperature=1.0, max_tokens=20, logprobs=0, prompt_logprobs=2, seed=6)),
    (prompts(seed=6), SamplingParams(temperature=0.0, max_tokens=17, logprobs=None)),
] + [(batch, params) for batch, params, _ in early_stop_cases()]  # EOS, stop ids and stop strings mid-run


@pytest.mark.parametrize("case", range(len(CASES)))
def test_samples_sent_in_pieces_equal_samples_sent_once(engines, case):
    reference, pieces, sent, sent_by_reference = engines
    batch, params = CASES[case]
    before = sent[0]
    want, got = reference.generate(batch, params), pieces.generate(batch, params)
    assert outputs(got) == outputs(want)
    assert [prompt_logprobs(r) for r in got] == [prompt_logprobs(r) for r in want]
    assert sent[0] > before + len(batch)  # several pieces a sample
    assert sent_by_reference[0] == 0
    assert not pieces.engine.requests and not pieces.engine.has_unfinished()


def test_a_server_answer_sent_in_pieces_equals_the_offline_engine(tiny_model, llm):
    """Through a real server (its replica sends every PARTIAL_OUTPUT_INTERVAL_S; its first step after the engine
    was idle that long is due at once, so every request here comes in at least two pieces): the offline engine's
    greedy tokens; the replica's stats count the pieces; a normal request after."""
    import time

    import httpx

    from server_utils import running_server
    batch = prompts(n=6, seed=7)
    params = SamplingParams(temperature=0.0, max_tokens=160, ignore_eos=True, logprobs=0)
    want = [o.outputs[0].token_ids for o in llm.generate(batch, params)]
    with running_server(tiny_model) as server, httpx.Client(base_url=server.url, timeout=120) as http:
        time.sleep(0.3)  # idle for longer than the interval: the request's first step sends
        r = http.post("/generate/", json={"prompts": batch, "max_tokens": 160, "temperature": 0.0, "logprobs": 0,
                                          "generation_kwargs": {"ignore_eos": True}})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["completion_ids"] == want
        assert [len(lps) for lps in answer["logprobs"]] == [160] * len(batch)
        deadline = time.monotonic() + 10  # the replica's stats arrive every 0.25 s
        while (sends := http.get("/server_info/").json()["replicas"][0]["num_partial_output_sends"]) == 0:
            assert time.monotonic() < deadline, "the replica never sent a running sample's tokens"
            time.sleep(0.1)
        ok = http.post("/generate/", json={"prompts": [[1, 2, 3]], "max_tokens": 3})
        assert ok.status_code == 200 and len(ok.json()["completion_ids"][0]) == 3
