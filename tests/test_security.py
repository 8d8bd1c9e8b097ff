"""Admission through real ``rlserve serve`` processes: the API key (401 and nothing runs; /health open; the
client and the openai SDK send it), weight-sync admission (403 and the weights unchanged; allowed from a listed
address), and the request-size limits (413 for the body, 400 for the number of prompts).

Three servers, loopback only: one with the key from $RLSERVE_API_KEY and small limits, one with
``--disable_weight_sync``, one with ``--api_key`` and ``--weight_sync_allowed_hosts 127.0.0.1``, which a client
bound to 127.0.0.2 (also loopback) reaches as a host that is not listed. Every refusal is followed by a request
that must succeed.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import types

import httpx
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from rlserve import Client
from rlserve.client.client import ServerError
from rlserve.models.tiny import make_tiny_model
from rlserve.server.security import (DEFAULT_MAX_BODY_MB, DEFAULT_MAX_PROMPTS, WEIGHT_SYNC_PATHS, SecurityConfig,
                                     is_weight_sync_path, parse_allowed_hosts, security_config_from_args)
from server_utils import free_port, running_server

KEY = "test-key-0123456789"
MAX_PROMPTS = 8
MAX_COMPLETIONS = 16
GREEDY = {"prompts": [[1, 2, 3], [40, 41, 42, 43]], "temperature": 0, "max_tokens": 8,
          "generation_kwargs": {"min_tokens": 8}}
AUTH = {"Authorization": f"Bearer {KEY}"}


def counters(http: httpx.Client, headers=None) -> dict:
    r = http.get("/server_info/", headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["counters"]


def greedy(http: httpx.Client, headers=None) -> list[list[int]]:
    r = http.post("/generate/", json=GREEDY, headers=headers)
    assert r.status_code == 200, r.text
    return r.json()["completion_ids"]


def assert_error(r: httpx.Response, status: int, *words: str) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param"}
    for word in words:
        assert word in error["message"], (word, error["message"])
    return error


# -- fixtures ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keyed(tiny_model):
    """Key from the environment, 1 MiB bodies, 8 prompts and 16 completions per request."""
    with running_server(tiny_model, "--max_request_body_mb", "1", "--max_prompts_per_request", str(MAX_PROMPTS),
                        "--max_completions_per_request", str(MAX_COMPLETIONS), env={"RLSERVE_API_KEY": KEY}) as s, \
            httpx.Client(base_url=s.url, timeout=120) as http:
        yield s, http


@pytest.fixture(scope="module")
def no_sync(tiny_model):
    with running_server(tiny_model, "--disable_weight_sync") as s, \
            httpx.Client(base_url=s.url, timeout=120) as http:
        yield s, http


@pytest.fixture(scope="module")
def allow_listed(tiny_model):
    """Weight sync from 127.0.0.1 only; ``other`` is an HTTP client bound to 127.0.0.2."""
    with running_server(tiny_model, "--api-key", KEY, "--weight-sync-allowed-hosts", "127.0.0.1") as s, \
            httpx.Client(base_url=s.url, timeout=120, headers=AUTH) as http, \
            httpx.Client(base_url=s.url, timeout=120, headers=AUTH,
                         transport=httpx.HTTPTransport(local_address="127.0.0.2")) as other:
        yield s, http, other


# -- the API key ---------------------------------------------------------------------------------------
BAD_AUTH = [None, {"Authorization": "Bearer wrong-key"}, {"Authorization": f"Bearer {KEY}x"},
            {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}, {"Authorization": KEY},
            {"X-Api-Key": KEY}]


@pytest.mark.parametrize("headers", BAD_AUTH, ids=lambda h: "none" if h is None else next(iter(h.values()))[:12])
def test_missing_or_wrong_key_is_401_and_nothing_runs(keyed, headers):
    _, http = keyed
    before = counters(http, AUTH)
    for method, path, body in [("POST", "/generate/", GREEDY), ("POST", "/generate", GREEDY),
                               ("POST", "/chat/", {"messages": [[{"role": "user", "content": "hi"}]]}),
                               ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 4}),
                               ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                               ("GET", "/v1/models", None), ("GET", "/server_info/", None), ("GET", "/metrics", None),
                               ("GET", "/get_world_size/", None), ("POST", "/reset_prefix_cache/", None),
                               ("POST", "/pause/", None), ("POST", "/abort/", None),
                               ("POST", "/init_communicator/", {"host": "127.0.0.1", "port": 1, "world_size": 2}),
                               ("GET", "/no_such_route", None), ("GET", "/docs", None)]:
        r = http.request(method, path, json=body, headers=headers)
        error = assert_error(r, 401, "API key", "Bearer")
        assert error["type"] == "authentication_error"
        assert r.headers["www-authenticate"] == "Bearer"
    after = counters(http, AUTH)
    assert after == before  # no prompt tokenized, no token generated, no request started
    assert greedy(http, AUTH)  # and the right key works
    assert counters(http, AUTH)["generation_tokens"] > after["generation_tokens"]


def test_health_is_open_without_a_key(keyed):
    _, http = keyed
    for path in ("/health", "/health/"):
        r = http.get(path)
        assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
    assert greedy(http, AUTH)


def test_client_sends_the_key(keyed, monkeypatch):
    server, _ = keyed
    with Client(base_url=server.url, api_key=KEY) as client:
        out = client.generate(["hello"], max_tokens=4)
        assert len(out["completion_ids"][0]) == 4
        assert client.server_info()["status"] == "serving"
    with Client(base_url=server.url, api_key="wrong") as client:
        with pytest.raises(ServerError) as e:
            client.generate(["hello"], max_tokens=4)
        assert e.value.status == 401
    monkeypatch.delenv("RLSERVE_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", KEY)  # read when $RLSERVE_API_KEY is not set
    with Client(base_url=server.url) as client:
        assert client.get_world_size() == 1
    monkeypatch.setenv("RLSERVE_API_KEY", KEY)
    monkeypatch.setenv("VLLM_API_KEY", "wrong")
    with Client(base_url=server.url) as client:
        assert len(client.chat([[{"role": "user", "content": "hi"}]], max_tokens=3)["completion_ids"][0]) == 3


def test_openai_sdk_sends_the_key(keyed):
    server, http = keyed
    with openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        out = c.completions.create(model=c.models.list().data[0].id, prompt="hello", max_tokens=4)
        assert out.choices[0].text is not None and out.usage.completion_tokens == 4
        chat = c.chat.completions.create(model=out.model, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3)
        assert chat.usage.completion_tokens == 3
    before = counters(http, AUTH)
    with openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=120) as c:
        with pytest.raises(openai.AuthenticationError) as e:
            c.completions.create(model=out.model, prompt="hello", max_tokens=4)
        assert "API key" in str(e.value)
    assert counters(http, AUTH) == before
    assert greedy(http, AUTH)


# -- request size --------------------------------------------------------------------------------------
def test_oversize_body_is_413_then_a_normal_request_works(keyed):
    _, http = keyed
    before = counters(http, AUTH)
    big = {"prompts": [list(range(1, 200))] * 4000, "max_tokens": 1}  # ~3 MB of JSON, limit 1 MiB
    error = assert_error(http.post("/generate/", json=big, headers=AUTH), 413, "1,048,576 bytes",
                         "--max_request_body_mb")
    assert error["type"] == "request_too_large"
    assert greedy(http, AUTH)

    def chunks():  # no Content-Length: the server counts as it reads
        yield b'{"prompts": ['
        for _ in range(3000):
            yield b"[" + b"1, " * 200 + b"1], "
        yield b"[1]]}"

    r = http.post("/generate/", content=chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 413, "1,048,576 bytes", "--max_request_body_mb")
    assert counters(http, AUTH)["prompt_tokens"] == before["prompt_tokens"] + sum(map(len, GREEDY["prompts"]))

    def small_chunks():  # a chunked upload under the limit is served
        yield b'{"prompts": [[1, 2, 3]], "max_tokens": 3, '
        yield b'"temperature": 0}'

    r = http.post("/generate/", content=small_chunks(), headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 200 and len(r.json()["completion_ids"][0]) == 3, r.text
    assert greedy(http, AUTH)


def test_too_many_prompts_is_400_naming_the_limit(keyed):
    _, http = keyed
    before = counters(http, AUTH)
    n = MAX_PROMPTS + 1
    for path, body, field in [
            ("/generate/", {"prompts": ["hi"] * n, "max_tokens": 1}, "prompts"),
            ("/chat/", {"messages": [[{"role": "user", "content": "hi"}]] * n, "max_tokens": 1}, "messages"),
            ("/v1/completions", {"prompt": [[1, 2]] * n, "max_tokens": 1}, "prompt")]:
        error = assert_error(http.post(path, json=body, headers=AUTH), 400, f"limit of {MAX_PROMPTS}",
                             "--max_prompts_per_request")
        assert error["param"] == field
    assert counters(http, AUTH) == before
    r = http.post("/generate/", json={"prompts": ["hi"] * MAX_PROMPTS, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["completion_ids"]) == MAX_PROMPTS, r.text


def test_too_many_completions_is_400_naming_n_and_the_limit(keyed):
    """prompts x n is what the API process holds until the request ends: each factor valid alone, the product not."""
    _, http = keyed
    before = counters(http, AUTH)
    for path, body in [
            ("/generate/", {"prompts": ["hi"] * 3, "n": 6, "max_tokens": 1}),
            ("/chat/", {"messages": [[{"role": "user", "content": "hi"}]] * 3, "n": 6, "max_tokens": 1}),
            ("/v1/completions", {"prompt": [[1, 2]] * 3, "n": 6, "max_tokens": 1})]:
        error = assert_error(http.post(path, json=body, headers=AUTH), 400, "18 completions",
                             f"limit of {MAX_COMPLETIONS}", "--max_completions_per_request")
        assert error["param"] == "n"
    assert counters(http, AUTH) == before
    r = http.post("/generate/", json={"prompts": ["hi"] * 2, "n": 8, "max_tokens": 2}, headers=AUTH)
    assert r.status_code == 200 and len(r.json()["completion_ids"]) == MAX_COMPLETIONS, r.text


# -- weight-sync admission -----------------------------------------------------------------------------
def weight_sync_calls(engine_world_size: int = 1):
    """One call per weight-sync route, each of which would start or feed a transfer if admitted."""
    return [("/init_communicator/", {"host": "127.0.0.1", "port": free_port(), "world_size": engine_world_size + 1}),
            ("/init_communicator", {"host": "127.0.0.1", "port": free_port(), "world_size": engine_world_size + 1}),
            ("/update_named_param/", {"name": "model.embed_tokens.weight", "dtype": "torch.float32",
                                      "shape": [1, 1]}),
            ("/update_weights/", {"buckets": []}), ("/update_weights", {"buckets": []}),
            ("/close_communicator/", None),
            ("/init_weight_transfer_engine", {}), ("/start_weight_update", {}), ("/finish_weight_update/", {})]


def test_disabled_weight_sync_is_403_and_the_weights_are_unchanged(no_sync):
    server, http = no_sync
    before = greedy(http)
    for path, body in weight_sync_calls():
        assert assert_error(http.post(path, json=body), 403, "--disable_weight_sync")["type"] == "permission_error"
    with Client(base_url=server.url, group_port=free_port()) as client:
        with pytest.raises(ServerError) as e:
            client.init_communicator(device="cpu", timeout_s=10)
        assert e.value.status == 403 and "--disable_weight_sync" in e.value.message
    assert greedy(http) == before
    info = http.get("/server_info/").json()
    assert info["weight_version"] == 0 and info["requested_weight_version"] == 0


def test_weight_sync_from_a_host_not_listed_is_403_and_the_weights_are_unchanged(allow_listed):
    _, http, other = allow_listed
    before = greedy(other)  # generation is open to any host that has the key
    for path, body in weight_sync_calls():
        assert_error(other.post(path, json=body), 403, "127.0.0.2", "--weight_sync_allowed_hosts")
        assert_error(other.post(path, json=body, headers={"Authorization": "Bearer wrong"}), 401)  # key first
    assert greedy(other) == before
    assert greedy(http) == before
    assert http.get("/server_info/").json()["requested_weight_version"] == 0


def test_weight_sync_from_a_listed_host_updates_the_weights(allow_listed, tmp_path):
    server, http, _ = allow_listed
    before = greedy(http)
    path_b = make_tiny_model(tmp_path / "b", "qwen2", seed=1234)
    model_b = AutoModelForCausalLM.from_pretrained(path_b, dtype=torch.float32).eval()
    with Client(base_url=server.url, api_key=KEY, group_port=free_port()) as client:  # from 127.0.0.1
        client.init_communicator(device="cpu", timeout_s=30)
        assert client.update_model_params(model_b) == 1
        after = greedy(http)
        client.close_communicator()
    assert after != before


# -- configuration, no server --------------------------------------------------------------------------
def test_every_weight_sync_route_is_covered():
    """A route that moves weights and is missing from WEIGHT_SYNC_PATHS would bypass the admission check."""
    from rlserve.server.app import create_app
    app = create_app(types.SimpleNamespace())
    paths = [r.path for r in app.routes if getattr(r, "endpoint", None) is not None]
    assert paths
    for route in app.routes:
        endpoint = getattr(route, "endpoint", None)
        if endpoint is None:
            continue
        moves_weights = endpoint.__module__.endswith("routes_weights") or (
            "POST" in route.methods and any(w in route.path for w in ("weight", "communicator", "named_param")))
        if moves_weights:
            assert is_weight_sync_path(route.path), route.path
    for path in ("/generate/", "/chat", "/v1/completions", "/server_info/", "/health", "/reset_prefix_cache/"):
        assert not is_weight_sync_path(path)
    for prefix in WEIGHT_SYNC_PATHS:
        assert is_weight_sync_path(prefix) and is_weight_sync_path(prefix + "/") and \
            is_weight_sync_path(prefix + "//") and is_weight_sync_path(prefix + "/x")
        assert not is_weight_sync_path(prefix + "x")
    assert create_app(types.SimpleNamespace(), security=SecurityConfig(weight_sync_enabled=False)) \
        .state.weight_sync_enabled is False


def test_allowed_hosts_parsing():
    config = SecurityConfig(weight_sync_allowed_hosts=parse_allowed_hosts(" 10.0.0.5, 127.0.0.1,fd00::/8"))
    assert config.is_host_allowed("10.0.0.5") and config.is_host_allowed("127.0.0.1")
    assert config.is_host_allowed("::ffff:10.0.0.5")  # an IPv4 client on a dual-stack socket
    assert config.is_host_allowed("fd00::1")
    assert not config.is_host_allowed("10.0.0.6") and not config.is_host_allowed("127.0.0.2")
    assert not config.is_host_allowed(None) and not config.is_host_allowed("testclient")
    assert SecurityConfig().is_host_allowed("203.0.113.9")  # no list: any host
    assert parse_allowed_hosts("") is None
    with pytest.raises(ValueError, match="weight_sync_allowed_hosts"):
        parse_allowed_hosts("trainer-node-1")
    with pytest.raises(ValueError, match="no address"):
        parse_allowed_hosts(" , ")
    with pytest.raises(ValueError, match="max_prompts_per_request"):
        SecurityConfig(max_prompts=0)


def test_serve_flags_and_their_defaults(monkeypatch):
    from rlserve.cli import add_serve_parser
    parser = argparse.ArgumentParser(prog="rlserve")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    monkeypatch.delenv("RLSERVE_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    default = security_config_from_args(parser.parse_args(["serve", "--model", "m"]))
    assert default == SecurityConfig() and default.api_key is None and default.weight_sync_enabled
    assert default.max_body_bytes == DEFAULT_MAX_BODY_MB * 2**20 and default.max_prompts == DEFAULT_MAX_PROMPTS
    monkeypatch.setenv("VLLM_API_KEY", "from-vllm")
    assert security_config_from_args(parser.parse_args(["serve", "--model", "m"])).api_key == "from-vllm"
    monkeypatch.setenv("RLSERVE_API_KEY", "from-rlserve")
    assert security_config_from_args(parser.parse_args(["serve", "--model", "m"])).api_key == "from-rlserve"
    for sep in "_-":
        args = parser.parse_args(["serve", "--model", "m", f"--api{sep}key", "k", f"--disable{sep}weight{sep}sync",
                                  f"--weight{sep}sync{sep}allowed{sep}hosts", "10.0.0.5",
                                  f"--max{sep}request{sep}body{sep}mb", "2", f"--max{sep}prompts{sep}per{sep}request",
                                  "3", f"--max{sep}completions{sep}per{sep}request", "5"])
        config = security_config_from_args(args)
        assert dataclasses.astuple(config)[:2] == ("k", False)
        assert config.is_host_allowed("10.0.0.5") and not config.is_host_allowed("10.0.0.4")
        assert (config.max_body_bytes, config.max_prompts, config.max_completions) == (2 * 2**20, 3, 5)
    r = subprocess.run([sys.executable, "-m", "rlserve.cli", "serve", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    for flag in ("api_key", "disable_weight_sync", "weight_sync_allowed_hosts", "max_request_body_mb",
                 "max_prompts_per_request", "max_completions_per_request"):
        assert f"--{flag}" in r.stdout and f"--{flag.replace('_', '-')}" in r.stdout, flag


def test_only_health_is_open_and_websockets_need_the_key():
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from rlserve.server.app import create_app
    app = create_app(types.SimpleNamespace(), security=SecurityConfig(api_key=KEY))
    client = TestClient(app)  # no lifespan: nothing here needs the engine
    for path in ("/health/x", "/healthz", "/health/../server_info"):
        assert_error(client.get(path), 401)
    assert client.get("/no_such_route", headers=AUTH).status_code == 404
    with pytest.raises(WebSocketDisconnect) as e:
        with client.websocket_connect("/any"):
            pass
    assert e.value.code == 1008
