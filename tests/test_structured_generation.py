"""Structured outputs end to end: tiny random models (which would never produce the format unguided) always
produce it under a grammar -- sampled and greedy, n > 1 -- unguided neighbours are unaffected, bad grammars
are a 400, and the HTTP fields of TRL and OpenAI reach the engine."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from conftest import assert_no_leak
from rlserve import SamplingParams
from server_utils import running_server

REGEX = r"[0-9]{1,3}(\.[0-9]{1,2})?"
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["answer", "confident"],
          "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                         "confident": {"type": "boolean"}}}
CHOICES = ["yes", "no", "it depends"]
PROMPTS = [[1, 2, 3], list(b"What is 6 x 7?"), [200, 201]]


def check(kind, text):
    if kind == "regex":
        return re.fullmatch(REGEX, text) is not None
    if kind == "json":
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return False
        return (set(value) == {"answer", "confident"} and isinstance(value["answer"], int)
                and 0 <= value["answer"] <= 999 and isinstance(value["confident"], bool))
    return text in CHOICES


SPECS = {"regex": {"regex": REGEX}, "json": {"json": SCHEMA, "disable_any_whitespace": True},
         "choice": {"choice": CHOICES}}


@pytest.mark.parametrize("kind", ["regex", "json", "choice"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_completion_matches_the_grammar(llm, kind, temperature):
    params = SamplingParams(n=4, temperature=temperature, max_tokens=120, seed=3, logprobs=0,
                            structured_outputs=SPECS[kind])
    unguided = llm.generate(PROMPTS, params.clone(structured_outputs=None))
    assert not any(check(kind, c.text) for o in unguided for c in o.outputs)  # the model would not
    for out in llm.generate(PROMPTS, params):
        for c in out.outputs:
            assert c.finish_reason == "stop" and check(kind, c.text), (c.text, c.finish_reason)
            assert len(c.sampled_logprobs) == len(c.token_ids)
    assert_no_leak(llm)


def test_guided_requests_do_not_change_unguided_neighbours(llm):
    plain = SamplingParams(n=2, temperature=1.0, max_tokens=24, seed=11)
    alone = llm.generate(PROMPTS, plain)
    mixed = llm.generate(PROMPTS + PROMPTS, [plain] * 3 + [plain.clone(structured_outputs=SPECS["regex"])] * 3)
    assert [[c.token_ids for c in o.outputs] for o in alone] == [[c.token_ids for c in o.outputs]
                                                                  for o in mixed[:3]]
    assert all(check("regex", c.text) for o in mixed[3:] for c in o.outputs)


def test_logprobs_are_those_of_the_masked_distribution(llm):
    """Under a two-choice grammar whose first characters differ, the first token's probabilities sum to 1
    over the two allowed tokens."""
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=1.0, max_tokens=8, logprobs=5, seed=1,
                                                   structured_outputs={"choice": ["A", "B"]}))[0].outputs[0]
    import math
    first = [(tid, lp) for tid, lp in out.top_logprobs[0] if lp > -math.inf]
    assert {tid for tid, _ in first} == {ord("A"), ord("B")}
    assert abs(sum(math.exp(lp) for _, lp in first) - 1.0) < 1e-5


@pytest.mark.parametrize("spec, message", [
    ({"regex": "a(?=b)"}, "structured_outputs.regex"),
    ({"json": "{not json"}, "structured_outputs.json"),
    ({"choice": []}, "structured_outputs.choice"),
    ({"regex": "a", "choice": ["b"]}, "structured_outputs"),
    ({"nope": 1}, "structured_outputs"),
])
def test_bad_grammar_is_a_value_error_naming_it(llm, spec, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[1, 2]], SamplingParams(structured_outputs=spec))
    assert llm.generate([[1, 2]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids
    assert_no_leak(llm)


def test_http_fields_reach_the_engine(tiny_model):
    with running_server(tiny_model) as server:
        url = server.url
        r = httpx.post(url + "/generate/", json={"prompts": ["x"], "n": 3, "max_tokens": 32,
                                                 "structured_outputs_regex": REGEX}, timeout=60).json()
        texts = [bytes(t for t in ids if t < 256).decode(errors="replace") for ids in r["completion_ids"]]
        assert all(check("regex", t) for t in texts), texts
        for kind in ("regex", "json", "choice"):
            r = httpx.post(url + "/generate/", json={
                "prompts": [[1, 2, 3]], "n": 2, "max_tokens": 120,
                "generation_kwargs": {"structured_outputs": SPECS[kind]}}, timeout=60).json()
            assert all(check(kind, bytes(t for t in ids if t < 256).decode()) for ids in r["completion_ids"])
        chat = httpx.post(url + "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "answer in JSON"}], "max_tokens": 200, "n": 2,
            "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
            timeout=60).json()
        finished = [c["message"]["content"] for c in chat["choices"] if c["finish_reason"] == "stop"]
        assert finished and all(check("json", t) for t in finished)
        bad = httpx.post(url + "/generate/", json={"prompts": ["x"], "structured_outputs_regex": "a(?=b)"},
                         timeout=60)
        assert bad.status_code == 400 and "structured_outputs.regex" in bad.json()["error"]["message"]
        assert httpx.post(url + "/generate/", json={"prompts": ["x"]}, timeout=60).status_code == 200
