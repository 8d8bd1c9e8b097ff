"""Token-by-token ``stream=true`` on /v1/completions and /v1/chat/completions against a real ``rlserve serve``:
vLLM's chunk layout, the deltas of each choice concatenating to the non-streamed text of the same seeded
request (with and without stop strings), the usage chunk, and a client that goes away mid-stream."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from rlserve.sampling import SamplingParams
# server, client and http: test_openai's module fixtures (imported, each module gets its own server)
from test_openai import MESSAGES, PROMPTS, assert_serves, client, http, server, wait_idle  # noqa: F401


def stream_events(http, path: str, body: dict) -> list[dict]:
    """The JSON chunks of a streamed request; asserts the stream ends with [DONE]."""
    with http.stream("POST", path, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert data and data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


def by_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    choices: dict[int, list[dict]] = {}
    for chunk in chunks:
        assert len(chunk["choices"]) <= 1
        for c in chunk["choices"]:
            choices.setdefault(c["index"], []).append(c)
    return choices


def assert_finish_only_last(choices: dict[int, list[dict]]) -> None:
    for parts in choices.values():
        assert parts[-1]["finish_reason"] in ("stop", "length")
        assert all(p["finish_reason"] is None for p in parts[:-1])


def test_completions_stream_token_by_token_equals_non_streamed(http, tiny_model):
    body = dict(model=tiny_model, prompt=PROMPTS, n=2, max_tokens=16, temperature=1.0, seed=11,
                ignore_eos=True)
    whole = http.post("/v1/completions", json=body).json()["choices"]
    chunks = stream_events(http, "/v1/completions", body)
    assert all(c["object"] == "text_completion" and c["model"] == tiny_model for c in chunks)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("cmpl-")
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1, 2, 3]  # prompt index * n + sample index, as the non-streamed response
    for index, parts in choices.items():
        assert len([p for p in parts if p["text"]]) >= 2, parts  # it really streams
        assert "".join(p["text"] for p in parts) == whole[index]["text"]
        assert parts[-1]["finish_reason"] == whole[index]["finish_reason"] == "length"
    assert_finish_only_last(choices)
    # choices interleave: the first chunk of the last choice comes before the last chunk of the first
    positions = {i: [n for n, c in enumerate(chunks) if c["choices"][0]["index"] == i] for i in choices}
    assert positions[3][0] < positions[0][-1]


def test_completions_stream_logprobs_per_delta(http, tiny_model):
    body = dict(model=tiny_model, prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=3, logprobs=2,
                ignore_eos=True, return_token_ids=True)
    whole = http.post("/v1/completions", json=body).json()["choices"][0]
    parts = by_choice(stream_events(http, "/v1/completions", body))[0]
    streamed = {key: [v for p in parts if p["logprobs"] for v in p["logprobs"][key]]
                for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert streamed == {key: whole["logprobs"][key] for key in streamed}
    assert [t for p in parts for t in p["token_ids"]] == whole["token_ids"]
    # the prompt's ids once, with the choice's first chunk (as the non-streamed choice has them)
    assert parts[0]["prompt_token_ids"] == whole["prompt_token_ids"] and all("prompt_token_ids" not in p
                                                                             for p in parts[1:])


def test_chat_stream_role_first_then_content(http, client, tiny_model):
    body = dict(model=tiny_model, messages=MESSAGES, n=2, max_tokens=16, temperature=1.0, seed=5,
                ignore_eos=True)
    whole = http.post("/v1/chat/completions", json=body).json()["choices"]
    chunks = stream_events(http, "/v1/chat/completions", body)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks) and chunks[0]["id"].startswith("chatcmpl-")
    choices = by_choice(chunks)
    assert sorted(choices) == [0, 1]
    for index, parts in choices.items():
        assert parts[0]["delta"]["role"] == "assistant"
        assert all("role" not in p["delta"] for p in parts[1:])
        assert len([p for p in parts if p["delta"].get("content")]) >= 2
        assert "".join(p["delta"].get("content", "") for p in parts) == whole[index]["message"]["content"]
    assert_finish_only_last(choices)
    # and through the SDK
    sdk = {}
    for chunk in client.chat.completions.create(model=tiny_model, messages=MESSAGES, n=2, max_tokens=16,
                                                temperature=1.0, seed=5, stream=True,
                                                extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            sdk[c.index] = sdk.get(c.index, "") + (c.delta.content or "")
    assert sdk == {c["index"]: c["message"]["content"] for c in whole}
    # return_token_ids: the prompt's ids once, at the top level of the first chunk (as the non-streamed response)
    body = dict(body, return_token_ids=True)
    want = http.post("/v1/chat/completions", json=body).json()["prompt_token_ids"]
    chunks = stream_events(http, "/v1/chat/completions", body)
    assert chunks[0]["prompt_token_ids"] == want and all("prompt_token_ids" not in c for c in chunks[1:])


def test_stream_with_stop_strings_equals_the_cut_text(http, tiny_model):
    body = dict(model=tiny_model, prompt=PROMPTS[1], n=3, max_tokens=40, temperature=1.0, seed=5,
                ignore_eos=True)
    full = http.post("/v1/completions", json=body).json()["choices"]
    # Two-character stops taken from each sample's text: every sample stops, and the held-back tail matters.
    stops = sorted({c["text"][6:8] for c in full if len(c["text"]) >= 8 and "\ufffd" not in c["text"][6:8]})
    assert stops
    cut = http.post("/v1/completions", json=dict(body, stop=stops)).json()["choices"]
    assert any(c["finish_reason"] == "stop" for c in cut)
    choices = by_choice(stream_events(http, "/v1/completions", dict(body, stop=stops)))
    for c in cut:
        parts = choices[c["index"]]
        streamed = "".join(p["text"] for p in parts)
        assert streamed == c["text"] and not any(stop in streamed for stop in stops)
        assert parts[-1]["finish_reason"] == c["finish_reason"] and parts[-1]["stop_reason"] == c["stop_reason"]
    assert_finish_only_last(choices)
    # chat, with the stop string kept
    chat = dict(model=tiny_model, messages=MESSAGES, max_tokens=30, temperature=1.0, seed=9, ignore_eos=True,
                stop=stops, include_stop_str_in_output=True)
    want = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
    parts = by_choice(stream_events(http, "/v1/chat/completions", chat))[0]
    assert "".join(p["delta"].get("content", "") for p in parts) == want


def test_include_usage_adds_a_last_chunk_without_choices(http, tiny_model):
    body = dict(model=tiny_model, prompt=PROMPTS, n=2, max_tokens=5, temperature=0, ignore_eos=True,
                stream_options={"include_usage": True})
    whole = http.post("/v1/completions", json=dict(body, stream_options=None)).json()
    chunks = stream_events(http, "/v1/completions", body)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    assert all(c["usage"] is None for c in chunks[:-1])
    chat = stream_events(http, "/v1/chat/completions", dict(model=tiny_model, messages=MESSAGES, max_tokens=4,
                                                            stream_options={"include_usage": True}))
    assert chat[-1]["choices"] == [] and chat[-1]["usage"]["completion_tokens"] >= 1
    plain = stream_events(http, "/v1/completions", dict(body, stream_options=None))
    assert all("usage" not in c for c in plain)


def test_stream_errors_are_http_errors_before_any_event(http, client, tiny_model):
    r = http.post("/v1/completions", json=dict(model=tiny_model, prompt="hi", max_tokens=4, temperature=-1,
                                              stream=True))
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = http.post("/v1/chat/completions", json=dict(model=tiny_model, messages=MESSAGES, max_tokens=2048,
                                                   stream=True))
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert_serves(client, tiny_model)


def test_a_grammar_the_replica_refuses_is_a_400_before_any_event(http, client, tiny_model):
    """Only the replica compiles a grammar: the stream waits for the request's first updates before it answers, so
    the refusal is an HTTP 400 naming the field, as without stream=true, not an error event after a 200."""
    for path, body in [("/v1/completions", dict(prompt="hi")), ("/v1/chat/completions", dict(messages=MESSAGES))]:
        body = dict(body, model=tiny_model, max_tokens=4, structured_outputs={"regex": "a(?=b)"})
        plain = http.post(path, json=body)
        streamed = http.post(path, json=dict(body, stream=True))
        assert plain.status_code == streamed.status_code == 400, streamed.text
        assert streamed.json()["error"]["param"] == plain.json()["error"]["param"] == "structured_outputs"
        assert "regex" in streamed.json()["error"]["message"]
    wait_idle(http)
    assert_serves(client, tiny_model)


def test_an_unexpected_failure_mid_stream_is_an_error_event_then_done():
    """Not a ServerError (a bug of the server's): the stream still ends with an error event and [DONE], and the
    group is let go and its running requests aborted."""
    import asyncio

    async def next_updates(group, is_disconnected=None):
        raise RuntimeError("boom")

    stream, released, aborted = _fake_stream(next_updates)
    stream.first, stream.started = [], True  # as if start() had returned an empty first batch

    async def collect():
        return [event async for event in stream.events()]

    events = asyncio.run(collect())
    assert json.loads(events[0][len("data: "):])["error"] == {"message": "RuntimeError: boom", "type": "internal_error",
                                                             "code": 500}
    assert events[-1] == "data: [DONE]\n\n" and released == ["group"] and aborted == ["r0"]


def _fake_stream(next_updates):
    """A ResponseStream over a fake engine; returns it and the lists of released groups and aborted ids."""
    from types import SimpleNamespace

    from rlserve.server.openai_stream import ResponseStream
    released, aborted = [], []
    engine = SimpleNamespace(tokenizer=None, next_updates=next_updates,
                             release=lambda group: released.append(group) or ["r0"], abort_soon=aborted.extend)
    stream = ResponseStream(engine, "group", [], SamplingParams(max_tokens=4), chat=False, model="m",
                            include_usage=False, return_token_ids=False, format_logprobs=lambda *a: None)
    return stream, released, aborted


def test_a_response_that_never_starts_its_body_still_aborts_its_requests():
    """The client leaves before the first byte: the server cancels the response (or sending the headers fails)
    before the body is iterated, so the body's own cleanup never runs; EventStreamResponse closes the stream."""
    import asyncio

    from rlserve.server.openai_stream import EventStreamResponse

    async def never(group, is_disconnected=None):
        await asyncio.sleep(3600)

    stream, released, aborted = _fake_stream(never)
    stream.first, stream.started = [], True

    async def send(message):
        raise OSError("client gone")  # the headers cannot be sent

    async def receive():
        return {"type": "http.disconnect"}

    async def respond():
        from starlette.requests import ClientDisconnect
        try:
            await EventStreamResponse(stream)({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except ClientDisconnect:  # starlette's word for the failed send
            pass

    asyncio.run(asyncio.wait_for(respond(), 10))
    assert released == ["group"] and aborted == ["r0"]  # once


def test_start_waits_a_bounded_time_and_releases_once_when_it_fails(monkeypatch):
    """start(): a first update that does not come within START_WAIT_S starts the stream anyway (a queued request's
    client gets its headers); one that fails lets the group go and aborts, once, and raises."""
    import asyncio

    from rlserve.server import openai_stream
    monkeypatch.setattr(openai_stream, "START_WAIT_S", 0.05)

    async def slow(group, is_disconnected=None):
        await asyncio.sleep(3600)

    stream, released, aborted = _fake_stream(slow)
    asyncio.run(asyncio.wait_for(stream.start(), 10))
    assert stream.started and stream.first == [] and released == aborted == []

    async def refused(group, is_disconnected=None):
        raise openai_stream.ServerError("no such grammar", param="structured_outputs")

    stream, released, aborted = _fake_stream(refused)
    with pytest.raises(openai_stream.ServerError):
        asyncio.run(stream.start())
    stream.close()  # a second close (the response's) does nothing more
    assert released == ["group"] and aborted == ["r0"]


def test_client_gone_mid_stream_aborts_the_request(server, http, client, tiny_model):
    for path, body in [("/v1/completions", dict(prompt=PROMPTS[0], n=4)),
                       ("/v1/chat/completions", dict(messages=MESSAGES, n=4, stop=["\x00\x01"]))]:
        wait_idle(http)
        before = http.get("/server_info/").json()["counters"]["requests_aborted"]
        with httpx.Client(base_url=server.url, timeout=30) as gone:
            with gone.stream("POST", path, json=dict(body, model=tiny_model, max_tokens=1900, ignore_eos=True,
                                                     stream=True)) as r:
                assert r.status_code == 200
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
                assert json.loads(first[len("data: "):])["choices"]
        # the response is closed: the engine request ends as aborted, long before its 1900 tokens
        deadline = time.monotonic() + 30
        while http.get("/server_info/").json()["counters"]["requests_aborted"] == before:
            assert time.monotonic() < deadline, "the streamed request was not aborted"
            time.sleep(0.1)
        wait_idle(http)
        assert_serves(client, tiny_model)


def _sentencepiece_like_tokenizer():
    """A Metaspace vocabulary with Llama-2's legacy decoder: decoding with the prompt as context keeps the first
    output token's leading space, a plain decode of the output drops it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<unk>": 0, "▁Hello": 1, "▁world": 2, "!": 3, "▁Say": 4, "▁foo": 5}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    core.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core)


@pytest.mark.parametrize("stop", [["zz"], ["zzz"]])
def test_a_stop_string_sample_that_ends_otherwise_streams_its_final_text(stop):
    """With stop strings, a sample that ends by length (or EOS, or an abort) gets the text of the engine's stop
    detokenizer (prompt as context), so the streamed deltas -- decoded the same way -- add up to it exactly, on a
    tokenizer where a decode without context differs (the leading space)."""
    from rlserve.engine.stop_strings import StopStrings
    from rlserve.server.openai_stream import SampleText
    tokenizer = _sentencepiece_like_tokenizer()
    prompt, tokens = [4], [1, 2, 3, 5, 2]
    params = SamplingParams(stop=stop, max_tokens=len(tokens))
    state = StopStrings(tokenizer, prompt, params).new_state()
    assert all(state.add(t, can_stop=True) is None for t in tokens)  # no stop string: it ends by length
    final = state.final_text()  # what EngineCore._update sends for a finished sample with stop strings
    assert final != tokenizer.decode(tokens)  # the case the test is about: context matters here
    text = SampleText(tokenizer, prompt, params)
    assert "".join(text.add([t]) for t in tokens) + text.add([], final) == final


def test_a_stop_string_sample_that_ends_by_length_carries_the_detokenizers_text(llm):
    """EngineCore._update: a finished sample with stop strings sends its stop detokenizer's text even when no
    stop string ended it (a streamed response's final delta is cut from it)."""
    core = llm.engine
    core.add_request("length-with-stops", [5, 6, 7], SamplingParams(max_tokens=4, temperature=0,
                                                                   stop=["\x00never"]))
    updates = []
    for _ in range(50):
        updates += core.step()
        if not core.has_unfinished():
            break
    final = [u for u in updates if u.finish_reason is not None]
    assert len(final) == 1 and final[0].finish_reason == "length"
    assert final[0].text is not None and final[0].text == llm.tokenizer.decode(final[0].token_ids)
