"""The OpenAI-compatible subset (/v1/models, /v1/completions, /v1/chat/completions) through the official
``openai`` SDK and raw httpx, against a real ``rlserve serve`` process: outputs equal to the offline ``LLM``,
``n``, ``seed``, ``stop``, token-id prompts, ``return_token_ids``, both logprobs layouts, errors the SDK
parses, and a client that goes away mid-generation."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from rlserve import SamplingParams
from server_utils import running_server

PROMPTS = ["Hello, my name is", "The capital of France is"]
TOKEN_PROMPTS = [[1, 2, 3], [200, 100, 50, 25, 12]]
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def offline(llm, prompts, **params):
    return [c for o in llm.generate(prompts, SamplingParams(**params)) for c in o.outputs]


def assert_serves(client, model) -> None:
    """A normal request succeeds (after every negative test)."""
    out = client.completions.create(model=model, prompt="ok", max_tokens=2, temperature=0)
    assert len(out.choices) == 1 and out.usage.completion_tokens >= 1


def wait_idle(http, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        replicas = http.get("/server_info/").json()["replicas"]
        if all(r["kv_blocks_used"] == 0 and r["num_running"] == 0 and r["num_waiting"] == 0 for r in replicas):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"server not idle after {timeout}s: {replicas}")
        time.sleep(0.1)


# -- models -------------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(client, http, tiny_model):
    models = client.models.list()
    assert [m.id for m in models.data] == [tiny_model]
    raw = http.get("/v1/models").json()
    assert raw["object"] == "list" and raw["data"][0]["id"] == tiny_model and raw["data"][0]["object"] == "model"
    assert http.get("/v1/models/").status_code == 200  # trailing slash optional


# -- completions --------------------------------------------------------------------------------------------
def test_completions_greedy_equals_offline_llm(client, llm, tiny_model):
    out = client.completions.create(model=tiny_model, prompt=PROMPTS, max_tokens=12, temperature=0,
                                    extra_body={"return_token_ids": True})
    want = offline(llm, PROMPTS, max_tokens=12, temperature=0)
    assert [c.index for c in out.choices] == [0, 1]
    assert [c.text for c in out.choices] == [w.text for w in want]
    assert [c.token_ids for c in out.choices] == [w.token_ids for w in want]  # vLLM's extra fields
    assert [c.prompt_token_ids for c in out.choices] == [list(p.encode()) for p in PROMPTS]
    assert out.object == "text_completion" and out.model == tiny_model
    assert out.usage.prompt_tokens == sum(len(p.encode()) for p in PROMPTS)
    assert out.usage.completion_tokens == 24 and out.usage.total_tokens == out.usage.prompt_tokens + 24
    assert all(c.finish_reason == "length" and c.logprobs is None for c in out.choices)
    # the short model name (the directory's last part) is accepted too
    short = client.completions.create(model=tiny_model.rstrip("/").split("/")[-1], prompt=PROMPTS[0],
                                      max_tokens=12, temperature=0)
    assert short.choices[0].text == want[0].text


def test_completions_token_id_prompts(client, llm, tiny_model):
    single = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[0], max_tokens=8, temperature=0,
                                       extra_body={"return_token_ids": True})
    batch = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS, max_tokens=8, temperature=0,
                                      extra_body={"return_token_ids": True})
    want = offline(llm, TOKEN_PROMPTS, max_tokens=8, temperature=0)
    assert [c.token_ids for c in single.choices] == [want[0].token_ids]
    assert [c.token_ids for c in batch.choices] == [w.token_ids for w in want]
    assert batch.choices[1].prompt_token_ids == TOKEN_PROMPTS[1]


def test_completions_n_and_seed_grouped_by_prompt(client, llm, tiny_model):
    kwargs = dict(model=tiny_model, prompt=PROMPTS, n=3, max_tokens=8, temperature=1.0, seed=42,
                  extra_body={"return_token_ids": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    want = offline(llm, PROMPTS, n=3, max_tokens=8, temperature=1.0, seed=42)
    assert len(first.choices) == 6 and [c.index for c in first.choices] == list(range(6))
    assert [c.token_ids for c in first.choices] == [w.token_ids for w in want]  # p0 s0..s2, then p1
    assert [c.token_ids for c in again.choices] == [c.token_ids for c in first.choices]  # seeded: repeatable
    assert len({tuple(c.token_ids) for c in first.choices[:3]}) > 1  # the samples differ
    other = client.completions.create(**dict(kwargs, seed=43))
    assert [c.token_ids for c in other.choices] != [c.token_ids for c in first.choices]


def test_completions_stop(client, llm, tiny_model):
    full = offline(llm, [TOKEN_PROMPTS[0]], max_tokens=32, temperature=0)[0]
    at = next(i for i, t in enumerate(full.token_ids) if i > 0 and 33 <= t < 127)  # a printable ASCII byte
    stop = chr(full.token_ids[at])
    out = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[0], max_tokens=32, temperature=0,
                                    stop=[stop, "\x00never"], extra_body={"return_token_ids": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and choice.stop_reason == stop
    assert choice.text == full.text[:full.text.index(stop)] and stop not in choice.text
    assert choice.token_ids == full.token_ids[:at + 1]
    as_string = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[0], max_tokens=32,
                                          temperature=0, stop=stop)
    assert as_string.choices[0].text == choice.text


def test_completions_logprobs_layout(client, http, tiny_model):
    out = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[1], max_tokens=10, temperature=1.0,
                                    seed=3, logprobs=2, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens).replace("\ufffd", "") == choice.text.replace("\ufffd", "")
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0.0
        assert 1 <= len(top) <= 3 and top[token] == pytest.approx(logprob)  # the sampled token is always there
        assert list(top.values()) == sorted(top.values(), reverse=True)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    # token ids as tokens: nothing collides, so exactly top 2 plus the sampled token when it is not among them
    ids = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[1], max_tokens=10, temperature=1.0,
                                    seed=3, logprobs=2, extra_body={"return_tokens_as_token_ids": True,
                                                                    "return_token_ids": True}).choices[0]
    assert ids.token_ids == choice.token_ids
    assert ids.logprobs.tokens == [f"token_id:{t}" for t in choice.token_ids]
    assert ids.logprobs.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-5)
    # the same numbers as TRL's layout on /generate/
    trl = http.post("/generate/", json=dict(prompts=[TOKEN_PROMPTS[1]], max_tokens=10, temperature=1.0,
                                            logprobs=2, generation_kwargs={"seed": 3})).json()
    assert trl["completion_ids"][0] == choice.token_ids
    for top, trl_ids, trl_lps in zip(ids.logprobs.top_logprobs, trl["logprob_token_ids"][0], trl["logprobs"][0]):
        assert top == pytest.approx({f"token_id:{t}": v for t, v in zip(trl_ids, trl_lps)}, abs=1e-5)
    # logprobs=0: the sampled token alone
    zero = client.completions.create(model=tiny_model, prompt=TOKEN_PROMPTS[1], max_tokens=4, temperature=0,
                                     logprobs=0).choices[0].logprobs
    assert all(len(top) == 1 and top[t] == v for t, v, top in zip(zero.tokens, zero.token_logprobs,
                                                                     zero.top_logprobs))


def test_completions_stream(client, tiny_model):
    whole = client.completions.create(model=tiny_model, prompt=PROMPTS, max_tokens=6, temperature=0, n=2)
    chunks = list(client.completions.create(model=tiny_model, prompt=PROMPTS, max_tokens=6, temperature=0, n=2,
                                            stream=True))
    texts = {}
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in whole.choices}


def test_stop_strings_end_samples_in_the_engine_streamed_or_not(client, http, llm, tiny_model):
    """n samples stop at their own points; the SSE stream carries the same cut text; the engine drew no token
    past the last stop (it finds stop strings itself, in the step that completed them)."""
    kwargs = dict(model=tiny_model, prompt=TOKEN_PROMPTS[1], max_tokens=40, temperature=1.0, seed=5, n=3,
                  extra_body={"ignore_eos": True, "return_token_ids": True})
    full = client.completions.create(**kwargs).choices
    # One printable byte of each sample's: every sample stops, before max_tokens.
    stops = sorted({next(chr(t) for t in c.token_ids[3:] if 33 <= t < 127) for c in full})
    wait_idle(http)
    steps_before = sum(r["num_steps"] for r in http.get("/server_info/").json()["replicas"])
    cut = client.completions.create(**kwargs, stop=stops).choices
    steps = sum(r["num_steps"] for r in http.get("/server_info/").json()["replicas"]) - steps_before
    for whole, c in zip(full, cut):
        end = next((i + 1 for i, t in enumerate(whole.token_ids) if chr(t) in stops), None)
        if end is None:
            assert c.finish_reason == "length" and c.token_ids == whole.token_ids
            continue
        assert c.finish_reason == "stop" and c.stop_reason == chr(whole.token_ids[end - 1])
        assert c.token_ids == whole.token_ids[:end] and c.stop_reason not in c.text
    assert all(c.finish_reason == "stop" for c in cut) and len({len(c.token_ids) for c in cut}) > 1, cut
    assert steps == max(len(c.token_ids) for c in cut)
    streamed = {}
    for chunk in client.completions.create(**kwargs, stop=stops, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert streamed == {c.index: c.text for c in cut}


# -- chat completions ---------------------------------------------------------------------------------------
def test_chat_greedy_equals_offline_llm(client, llm, tiny_model):
    out = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=10, temperature=0,
                                         extra_body={"return_token_ids": True})
    want = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10))[0]
    choice = out.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.outputs[0].text
    assert choice.token_ids == want.outputs[0].token_ids
    assert out.prompt_token_ids == want.prompt_token_ids == llm.render_chat(MESSAGES)
    assert out.object == "chat.completion" and out.usage.prompt_tokens == len(want.prompt_token_ids)
    # max_completion_tokens (the newer name) wins over max_tokens
    newer = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=10,
                                           max_completion_tokens=3, temperature=0)
    assert newer.usage.completion_tokens == 3 and newer.choices[0].finish_reason == "length"


def test_chat_n_seed_and_stop(client, llm, tiny_model):
    kwargs = dict(model=tiny_model, messages=MESSAGES, n=4, max_tokens=8, temperature=1.0, seed=7,
                  extra_body={"return_token_ids": True})
    out, again = client.chat.completions.create(**kwargs), client.chat.completions.create(**kwargs)
    want = llm.chat(MESSAGES, SamplingParams(n=4, max_tokens=8, temperature=1.0, seed=7))[0].outputs
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in out.choices] == [w.token_ids for w in want]
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    full = llm.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=32))[0].outputs[0]
    at = next(i for i, t in enumerate(full.token_ids) if i > 0 and 33 <= t < 127)
    stop = chr(full.token_ids[at])
    stopped = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=32, temperature=0,
                                             stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full.text[:full.text.index(stop)]


def test_chat_logprobs_with_top_logprobs(client, tiny_model):
    out = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=6, temperature=0,
                                         logprobs=True, top_logprobs=2, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    content = choice.logprobs.content
    assert len(content) == len(choice.token_ids) == 6
    for entry in content:
        assert entry.logprob <= 0.0 and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(entry.logprob)  # greedy: the sampled token is the most likely
    as_ids = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=6, temperature=0,
                                            logprobs=True, top_logprobs=2,
                                            extra_body={"return_tokens_as_token_ids": True})
    entries = as_ids.choices[0].logprobs.content
    assert [e.token for e in entries] == [f"token_id:{t}" for t in choice.token_ids]
    assert [e.top_logprobs[0].token for e in entries] == [e.token for e in entries]
    plain = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None
    sampled_only = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=2,
                                                  temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in sampled_only.choices[0].logprobs.content)


def test_chat_stream(client, tiny_model):
    whole = client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=6,
                                                 temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


# -- errors -------------------------------------------------------------------------------------------------
def test_wrong_model_is_404(client, http, tiny_model):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=2)
    assert e.value.status_code == 404 and "no-such-model" in e.value.message
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)
    r = http.post("/v1/chat/completions", json=dict(model="nope", messages=MESSAGES, max_tokens=2))
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and r.json()["error"]["code"] == 404
    assert_serves(client, tiny_model)


def test_sdk_parses_400s_naming_the_field(client, tiny_model):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=tiny_model, prompt="hi", max_tokens=2, temperature=-1)
    assert e.value.status_code == 400 and "temperature" in e.value.message
    assert e.value.body["param"] == "temperature" and e.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=tiny_model, messages=MESSAGES, max_tokens=2, top_p=0)
    assert "top_p" in e.value.message
    assert_serves(client, tiny_model)


BAD = [
    # (path, body, text the message must contain, param)
    ("/v1/completions", dict(prompt=""), "prompt", "prompt"),
    ("/v1/completions", dict(prompt=[]), "prompt", "prompt"),
    ("/v1/completions", dict(prompt=[[]]), "prompt[0]", "prompt"),
    ("/v1/completions", dict(prompt=[1, 2, 259]), "259", None),
    ("/v1/completions", dict(prompt="x" * 2048), "max_model_len", None),
    ("/v1/completions", dict(prompt="hi", max_tokens=2048), "max_tokens", None),
    ("/v1/completions", dict(prompt="hi", max_tokens=0), "max_tokens", "max_tokens"),
    ("/v1/completions", dict(prompt="hi", n=0), "n must", "n"),
    ("/v1/completions", dict(prompt="hi", logprobs=50), "logprobs", "logprobs"),
    ("/v1/completions", dict(prompt="hi", top_k=-2), "top_k", "top_k"),
    ("/v1/completions", dict(prompt="hi", min_p=2), "min_p", "min_p"),
    ("/v1/completions", dict(prompt="hi", repetition_penalty=0), "repetition_penalty", "repetition_penalty"),
    ("/v1/completions", dict(prompt="hi", temperature="hot"), "temperature", "temperature"),
    ("/v1/completions", dict(prompt=5), "prompt", "prompt"),
    ("/v1/completions", dict(prompt="hi", echo=True), "echo", "echo"),
    ("/v1/completions", dict(), "prompt", "prompt"),
    ("/v1/chat/completions", dict(messages=[]), "messages", "messages"),
    ("/v1/chat/completions", dict(messages="hi"), "messages", "messages"),
    ("/v1/chat/completions", dict(messages=MESSAGES, logprobs=True, top_logprobs=50), "top_logprobs",
     "top_logprobs"),
    ("/v1/chat/completions", dict(messages=MESSAGES, max_completion_tokens=0), "max_tokens", "max_tokens"),
    ("/v1/chat/completions", dict(messages=MESSAGES, n="x"), "n", "n"),
    ("/v1/chat/completions", dict(messages=MESSAGES, response_format={"type": "xml"}), "response_format",
     "response_format"),
]


@pytest.mark.parametrize("path, body, field, param", BAD, ids=[f"{p[4:]}-{b}"[:60] for p, b, _, _ in BAD])
def test_bad_input_is_400_naming_the_field(http, client, tiny_model, path, body, field, param):
    r = http.post(path, json={"max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 400
    assert error["type"] == "invalid_request_error" and field in error["message"], error
    if param is not None:
        assert error["param"] == param, error
    assert_serves(client, tiny_model)


def test_client_gone_mid_generation_frees_kv_blocks(server, http, tiny_model):
    slow = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        slow.chat.completions.create(model=tiny_model, messages=MESSAGES, n=16, max_tokens=1900,
                                     extra_body={"ignore_eos": True})
    with pytest.raises(openai.APITimeoutError):
        slow.completions.create(model=tiny_model, prompt=PROMPTS, n=8, max_tokens=2000, stop=["\x00\x01"],
                                extra_body={"ignore_eos": True})
    slow.close()
    wait_idle(http)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60) as c:
        assert_serves(c, tiny_model)


def _reference_completion_logprobs(decode, token_ids, sampled, tops, as_ids, text_offset):
    """vLLM's completions logprobs, the plain way: a dict per token, the sampled token first, then the top N (a
    top entry that names the same string as an earlier one is dropped), sorted by logprob."""
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: decode([t]))
    tokens = [name(t) for t in token_ids]
    top = []
    for i, token in enumerate(token_ids):
        entries = {tokens[i]: sampled[i]}
        for tid, lp in (tops[i] if tops else []):
            if tid != token:
                entries.setdefault(name(tid), lp)
        top.append(dict(sorted(entries.items(), key=lambda item: -item[1])))
    offsets, at = [], text_offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": list(sampled), "top_logprobs": top, "text_offset": offsets}


def _reference_chat_logprobs(decode, token_ids, sampled, tops, as_ids):
    name = (lambda t: f"token_id:{t}") if as_ids else (lambda t: decode([t]))
    return {"content": [{"token": name(t), "logprob": sampled[i], "bytes": list(name(t).encode()),
                         "top_logprobs": [{"token": name(tid), "logprob": lp, "bytes": list(name(tid).encode())}
                                          for tid, lp in (tops[i] if tops else [])]}
                        for i, t in enumerate(token_ids)]}


@pytest.mark.parametrize("as_ids", [True, False])
@pytest.mark.parametrize("num_top", [0, 1, 3])
def test_logprob_layouts_built_a_list_at_a_time_equal_the_plain_per_token_build(as_ids, num_top):
    """The OpenAI routes build an RL batch's per-token logprob entries in bulk, names decoded once per answer;
    the result equals the plain per-token build, key order included: for random answers with repeated tokens,
    ties, a sampled token inside and outside the top N, and ids that decode to the same string."""
    import random
    from types import SimpleNamespace

    import numpy as np
    import orjson

    from rlserve.outputs import CompletionOutput, TopLogprobs
    from rlserve.server.routes_openai import _chat_logprobs, _completion_logprobs

    def decode(ids):  # ids 0-9 all decode alike (lone bytes as "\ufffd"); others to a word of their own
        return "\ufffd" if ids[0] < 10 else f" w{ids[0] % 37}é"

    engine = SimpleNamespace(tokenizer=SimpleNamespace(decode=decode))
    rng = random.Random(num_top * 2 + as_ids)
    names, chat_names = {}, {}
    for case in range(100):
        length = rng.randrange(0, 12)
        token_ids = [rng.randrange(0, 60) for _ in range(length)]
        sampled = [rng.choice([-0.5, -1.0, -rng.random() * 5]) for _ in range(length)]
        top_n = None
        if num_top:
            # the sampled id inside the top N or not; now and then an id twice in a row (the better-ranked one wins)
            ids = np.array([rng.sample(range(60), num_top) if rng.random() < 0.5 else
                            [rng.choice([t, rng.randrange(0, 60)]) for _ in range(num_top)] for t in token_ids],
                           dtype=np.int32).reshape(length, num_top)
            for row, t in zip(ids, token_ids):  # the sampled token at a random rank of a distinct-id row
                if len(set(row.tolist())) == num_top and t not in row and rng.random() < 0.5:
                    row[rng.randrange(num_top)] = t
            # by rank, as the sampler gives them; now and then out of order (the build then sorts each dict)
            values = np.array([sorted((rng.choice([-0.5, -1.0, -rng.random() * 5]) for _ in range(num_top)),
                                      reverse=rng.random() < 0.9) for _ in token_ids],
                              dtype=np.float32).reshape(length, num_top)
            top_n = TopLogprobs(ids, values)
        c = CompletionOutput(index=0, token_ids=token_ids, sampled_logprobs=sampled, top_n=top_n)
        offset = rng.choice([0, 7])
        got = _completion_logprobs(engine, c, as_ids, offset, names)
        want = _reference_completion_logprobs(decode, token_ids, sampled, c.top_logprobs, as_ids, offset)
        assert orjson.dumps(got) == orjson.dumps(want), case  # the same values in the same key order
        got = _chat_logprobs(engine, c, as_ids, chat_names)
        assert orjson.dumps(got) == orjson.dumps(_reference_chat_logprobs(decode, token_ids, sampled,
                                                                          c.top_logprobs, as_ids)), case
    assert _completion_logprobs(engine, CompletionOutput(index=0, token_ids=[1]), as_ids) is None
    assert _chat_logprobs(engine, CompletionOutput(index=0, token_ids=[1]), as_ids) is None
