"""Teacher scoring through a real ``rlserve serve`` process, read the way TRL's trainers read it: TRL 1.9-1.10's
``/get_sequence_logprobs/`` (JSON, and binary decoded by TRL's own ``_decode_binary_logprobs``) and TRL >= 1.12's
``/v1/completions`` with ``prompt_logprobs`` (through TRL's ``_format_sequence_logprobs``), equal to
transformers' log_softmax(logits / T) in fp32; the 400s, each followed by a request that succeeds."""

from __future__ import annotations

import math
import random

import httpx
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlserve import Client
from rlserve.models.tiny import BYTE_VOCAB
from server_utils import running_server
from trl_reference import _decode_binary_logprobs, _format_sequence_logprobs

MAX_MODEL_LEN = 64
TOL = 1e-4


@pytest.fixture(scope="module")
def server(tiny_model):
    # A small step budget: long sequences are computed in several chunks.
    with running_server(tiny_model, "--max_model_len", str(MAX_MODEL_LEN), "--max_num_batched_tokens", "32") as s:
        yield s


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def hf(tiny_model):
    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_logprobs(hf, seq, temperature) -> torch.Tensor:
    """[len(seq) - 1, V]: row p - 1 is the distribution of position p."""
    with torch.no_grad():
        logits = hf(torch.tensor([seq])).logits[0, :-1].float()
    return torch.log_softmax(logits / temperature, dim=-1)


def sequences_and_prompt_lengths(seed=0):
    rng = random.Random(seed)
    lengths = [(10, 4), (MAX_MODEL_LEN, 50), (5, 0), (7, 7), (1, 0), (40, 39)]  # (length, prompt length)
    return [[rng.randrange(0, 256) for _ in range(n)] for n, _ in lengths], [p for _, p in lengths]


def expected(hf, seq, prompt_length, k, temperature):
    """TRL's per-position view: top-k values and ids, the actual token's logprob; None for position 0."""
    ref = hf_logprobs(hf, seq, temperature)
    rows = []
    for pos in range(prompt_length, len(seq)):
        if pos == 0:
            rows.append(None)
            continue
        values, ids = ref[pos - 1].topk(k)
        rows.append((values.tolist(), ids.tolist(), ref[pos - 1, seq[pos]].item()))
    return rows


def assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64), atol=TOL, rtol=0)


def assert_serves(http):
    """A normal request succeeds (after every negative test)."""
    r = http.post("/get_sequence_logprobs/", json={"sequences": [[1, 2, 3]], "prompt_lengths": [1],
                                                   "top_logprobs": 2})
    assert r.status_code == 200, r.text
    assert len(r.json()["logprobs"][0]) == 2


def test_trl110_binary_decoded_by_trl(server, http, hf):
    seqs, prompt_lengths = sequences_and_prompt_lengths()
    k, temperature = 5, 0.7
    r = http.post("/get_sequence_logprobs/", json={"sequences": seqs, "prompt_lengths": prompt_lengths,
                                                   "top_logprobs": k, "temperature": temperature,
                                                   "response_format": "binary"})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"logprobs_b64", "token_ids_b64", "actual_logprobs_b64", "actual_token_ids_b64", "shape",
                           "completion_lengths"}
    lengths = [len(s) - p for s, p in zip(seqs, prompt_lengths)]
    assert answer["shape"] == [len(seqs), max(lengths), k] and answer["completion_lengths"] == lengths
    decoded = _decode_binary_logprobs(answer)
    for i, (seq, prompt_length) in enumerate(zip(seqs, prompt_lengths)):
        assert len(decoded["logprobs"][i]) == lengths[i]
        for t, want in enumerate(expected(hf, seq, prompt_length, k, temperature)):
            if want is None:  # position 0: padding, as trl vllm-serve left it
                assert decoded["logprobs"][i][t] == [-math.inf] * k and decoded["logprob_token_ids"][i][t] == [0] * k
                assert decoded["actual_logprobs"][i][t] == [-math.inf] and decoded["actual_token_ids"][i][t] == [0]
                continue
            values, ids, actual = want
            assert_close(decoded["logprobs"][i][t], values)
            assert decoded["logprob_token_ids"][i][t] == ids
            assert_close(decoded["actual_logprobs"][i][t], [actual])
            assert decoded["actual_token_ids"][i][t] == [seq[prompt_length + t]]
    # rlserve's Client decodes the same answer the same way.
    with Client(base_url=server.url) as client:
        assert client.get_sequence_logprobs(seqs, prompt_lengths, k, temperature) == decoded


def test_trl110_json_layout(http, hf):
    seqs, prompt_lengths = sequences_and_prompt_lengths(seed=1)
    k = 3
    r = http.post("/get_sequence_logprobs/", json={"sequences": seqs, "prompt_lengths": prompt_lengths,
                                                   "top_logprobs": k})  # temperature 1, json: TRL's defaults
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["shape"] is None and answer["logprobs_b64"] is None  # TRL's response model, binary fields null
    for i, (seq, prompt_length) in enumerate(zip(seqs, prompt_lengths)):
        rows = expected(hf, seq, prompt_length, k, 1.0)
        assert len(answer["logprobs"][i]) == len(answer["logprob_token_ids"][i]) == len(rows)
        for t, want in enumerate(rows):
            got_values, got_ids = answer["logprobs"][i][t], answer["logprob_token_ids"][i][t]
            if want is None:
                assert got_values == got_ids == []
                continue
            values, ids, actual = want
            token = seq[prompt_length + t]
            if token not in ids:  # sorted by rank, the actual token comes after the top k
                values, ids = values + [actual], ids + [token]
            assert got_ids == ids
            assert_close(got_values, values)


def test_trl116_completions_prompt_logprobs(http, hf, tiny_model):
    seqs, prompt_lengths = sequences_and_prompt_lengths(seed=2)
    seqs, prompt_lengths = seqs[:1] + seqs[2:], prompt_lengths[:1] + prompt_lengths[2:]  # < max_model_len
    k, temperature = 4, 0.7
    payload = {"model": tiny_model, "prompt": seqs, "max_tokens": 1, "temperature": temperature,
               "prompt_logprobs": k}  # exactly what TRL 1.16's get_sequence_logprobs sends
    r = http.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == len(seqs)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for choice, seq, prompt_length in zip(choices, seqs, prompt_lengths):
        raw = choice["prompt_logprobs"]
        assert len(raw) == len(seq) and raw[0] is None
        for pos in range(1, len(seq)):  # vLLM's layout: the actual token plus the top k, ranks 1..k
            entry = raw[pos]
            assert str(seq[pos]) in entry and len(entry) in (k, k + 1)
            for tid, item in entry.items():
                assert set(item) == {"logprob", "rank", "decoded_token"}
                assert item["decoded_token"] == tokenizer.decode([int(tid)])
        formatted = _format_sequence_logprobs(choice, seq, prompt_length, k)
        rows = expected(hf, seq, prompt_length, k, temperature)
        assert len(formatted["logprobs"]) == len(rows)
        for t, want in enumerate(rows):
            if want is None:
                assert formatted["logprobs"][t] == [-math.inf] * k and formatted["actual_logprobs"][t] == [-math.inf]
                continue
            values, ids, actual = want
            assert formatted["logprob_token_ids"][t] == ids
            assert_close(formatted["logprobs"][t], values)
            assert_close(formatted["actual_logprobs"][t], [actual])
            assert formatted["actual_token_ids"][t] == [seq[prompt_length + t]]
            rank = 1 + int((hf_logprobs(hf, seq, temperature)[prompt_length + t - 1] > actual).sum())
            assert raw[prompt_length + t][str(seq[prompt_length + t])]["rank"] == rank


def test_prompt_logprobs_beside_generation(http, hf, tiny_model):
    # A text prompt, n samples, a normal completion: each choice carries its prompt's logprobs.
    r = http.post("/v1/completions", json={"model": tiny_model, "prompt": ["Hello there", "Hi"], "n": 2,
                                           "max_tokens": 5, "min_tokens": 5, "prompt_logprobs": 2,
                                           "return_token_ids": True})
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert len(choices) == 4 and all(len(c["token_ids"]) == 5 for c in choices)
    assert choices[0]["prompt_logprobs"] == choices[1]["prompt_logprobs"]
    for c in choices:
        seq = c["prompt_token_ids"]
        ref = hf_logprobs(hf, seq, 1.0)
        assert len(c["prompt_logprobs"]) == len(seq)
        assert_close([c["prompt_logprobs"][p][str(seq[p])]["logprob"] for p in range(1, len(seq))],
                     [ref[p - 1, seq[p]].item() for p in range(1, len(seq))])
    plain = http.post("/v1/completions", json={"model": tiny_model, "prompt": "Hi", "max_tokens": 2}).json()
    assert plain["choices"][0]["prompt_logprobs"] is None
    # Chat completions: at the top level of the response, as vLLM puts it.
    r = http.post("/v1/chat/completions", json={"model": tiny_model, "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 2, "prompt_logprobs": 1, "return_token_ids": True})
    assert r.status_code == 200, r.text
    answer = r.json()
    seq = answer["prompt_token_ids"]
    assert len(answer["prompt_logprobs"]) == len(seq) and answer["prompt_logprobs"][0] is None
    assert_close(answer["prompt_logprobs"][-1][str(seq[-1])]["logprob"], hf_logprobs(hf, seq, 1.0)[-1, seq[-1]])


def test_no_sequences(http):
    r = http.post("/get_sequence_logprobs/", json={"sequences": [], "prompt_lengths": [], "top_logprobs": 4,
                                                   "response_format": "binary"})
    assert r.status_code == 200 and _decode_binary_logprobs(r.json())["logprobs"] == []
    assert r.json()["shape"] == [0, 0, 4]


SCORE = {"sequences": [[1, 2, 3]], "prompt_lengths": [1]}
BAD = [
    # (path, body, text the message must contain, param)
    ("/get_sequence_logprobs/", dict(SCORE, prompt_lengths=[1, 1]), "prompt_lengths has 2 entries for 1 sequences",
     "prompt_lengths"),
    ("/get_sequence_logprobs/", dict(SCORE, prompt_lengths=[-1]), "prompt_lengths[0] is -1, outside [0, 3]",
     "prompt_lengths"),
    ("/get_sequence_logprobs/", dict(SCORE, prompt_lengths=[4]), "prompt_lengths[0] is 4", "prompt_lengths"),
    ("/get_sequence_logprobs/", dict(SCORE, sequences=[[1] * 65]), "sequences[0] is 65 tokens, more than "
     "max_model_len (64)", "sequences"),
    ("/get_sequence_logprobs/", dict(SCORE, sequences=[[]], prompt_lengths=[0]), "sequences[0] must not be empty",
     "sequences"),
    ("/get_sequence_logprobs/", dict(SCORE, sequences=[[1, 2, BYTE_VOCAB]]), f"sequences[0]: prompt token id "
     f"{BYTE_VOCAB} is outside the vocabulary", "sequences"),
    ("/get_sequence_logprobs/", dict(SCORE, top_logprobs=-1), f"top_logprobs must be between 0 and {BYTE_VOCAB}",
     "top_logprobs"),
    ("/get_sequence_logprobs/", dict(SCORE, top_logprobs=BYTE_VOCAB + 1), "top_logprobs", "top_logprobs"),
    ("/get_sequence_logprobs/", dict(SCORE, temperature=0), "temperature must be > 0, got 0", "temperature"),
    ("/get_sequence_logprobs/", dict(SCORE, temperature=-1.0), "temperature must be > 0", "temperature"),
    ("/get_sequence_logprobs/", dict(SCORE, response_format="xml"), "response_format", "response_format"),
    ("/get_sequence_logprobs/", dict(prompt_lengths=[1]), "sequences", "sequences"),
    ("/v1/completions", dict(prompt=[[1, 2]], prompt_logprobs=-1), "prompt_logprobs must be >= 0",
     "prompt_logprobs"),
    ("/v1/completions", dict(prompt=[[1, 2]], prompt_logprobs=BYTE_VOCAB + 1),
     f"prompt_logprobs must be <= {BYTE_VOCAB} (the vocabulary size)", "prompt_logprobs"),
    ("/v1/completions", dict(prompt=[[1, 2]], prompt_logprobs=1001), "prompt_logprobs must be <= 1000",
     "prompt_logprobs"),
    ("/v1/completions", dict(prompt=[[1] * 64], prompt_logprobs=1), "max_model_len", "prompt"),
    ("/v1/chat/completions", dict(messages=[{"role": "user", "content": "hi"}], prompt_logprobs="all"),
     "prompt_logprobs", "prompt_logprobs"),
]


@pytest.mark.parametrize("path, body, text, param", BAD, ids=[f"{p[1:8]}-{b}"[:60] for p, b, _, _ in BAD])
def test_bad_input_is_400_naming_the_field(http, path, body, text, param):
    r = http.post(path, json={"max_tokens": 1, **body} if path.startswith("/v1") else body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert text in error["message"] and error["param"] == param, error
    assert_serves(http)
