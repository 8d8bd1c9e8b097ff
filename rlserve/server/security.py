"""Who may call the server, which calls may replace the weights, and how large a request may be.

One ASGI middleware in front of every route, so that a route added later is covered without knowing about
it. In order, for each HTTP request:

1. ``/health`` (and ``/health/``) passes untouched: probes carry no key.
2. API key: with ``api_key`` set, every other route needs ``Authorization: Bearer <key>`` (what the OpenAI
   SDK and vLLM send), compared in constant time; otherwise 401 and nothing runs.
3. Weight-sync admission: a path in ``WEIGHT_SYNC_PATHS`` is refused (403, logged) when weight sync is
   disabled, or when the caller's address is not in ``weight_sync_allowed_hosts``.
4. Body size: a request whose body is over ``max_body_bytes`` is a 413 before the route reads any of it
   (``Content-Length``), or as soon as the running count passes the limit (a chunked upload).

The number of prompts (and of completions, prompts x n) per request is a property of the parsed body, so the
routes that take prompts call ``check_num_prompts``. The middleware knows nothing about the engine; responses are rendered by errors.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
from typing import TYPE_CHECKING

from rlserve.server.errors import BadRequest, Forbidden, PayloadTooLarge, ServerError, Unauthorized, \
    server_error_response

if TYPE_CHECKING:
    from fastapi import Request

logger = logging.getLogger("rlserve.server")

# Every route that can start, feed or end a weight transfer (TRL's, vLLM's weight-transfer engine's and
# rlserve's own), matched with or without a trailing slash and with anything below it. A new weight-sync route
# must be listed here; tests/test_security.py checks that every registered one is.
WEIGHT_SYNC_PATHS = (
    "/init_communicator",
    "/update_named_param",
    "/update_weights",
    "/close_communicator",
    "/init_weight_transfer_engine",
    "/start_weight_update",
    "/finish_weight_update",
)

OPEN_PATHS = ("/health",)  # exactly these (trailing slash optional), no key: load-balancer and orchestrator probes

API_KEY_ENV_VARS = ("RLSERVE_API_KEY", "VLLM_API_KEY")  # first one set wins; VLLM_API_KEY as `vllm serve` reads it

# Also the defaults of `rlserve serve` (rlserve/cli.py). A TRL batch of 1024 prompts of 8k token ids each is about
# 45 MB of JSON; one prompt per GPU-step of a large GRPO run is a few thousand prompts.
DEFAULT_MAX_BODY_MB = 64.0
DEFAULT_MAX_PROMPTS = 16384
# prompts x n: every completion's tokens and logprobs stay in the API process until the request ends, so a
# request of 16,384 prompts with n = 1024 (both valid alone) would ask for 16.7M completions and run it out of
# memory. 16,384 prompts x 16 samples covers large GRPO batches.
DEFAULT_MAX_COMPLETIONS = 262144


def _matches(path: str, prefixes: tuple[str, ...]) -> bool:
    path = path.rstrip("/") or "/"
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def is_weight_sync_path(path: str) -> bool:
    return _matches(path, WEIGHT_SYNC_PATHS)


def api_key_from_env(environ=os.environ) -> tuple[str | None, str | None]:
    """(key, name of the variable it came from), or (None, None)."""
    for name in API_KEY_ENV_VARS:
        if environ.get(name):
            return environ[name], name
    return None, None


def parse_allowed_hosts(value: str | None) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """``"10.0.0.5,127.0.0.1,10.1.0.0/16"`` -> networks; None or "" -> None (any host)."""
    if not value:
        return None
    networks = []
    for item in (s.strip() for s in value.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"weight_sync_allowed_hosts: {item!r} is not an IP address or network (e.g. "
                             f"10.0.0.5 or 10.0.0.0/24); host names are not resolved") from None
    if not networks:
        raise ValueError("weight_sync_allowed_hosts: no address given")
    return tuple(networks)


@dataclasses.dataclass(frozen=True)
class SecurityConfig:
    """The server's admission rules, built once at the edge (``rlserve serve`` flags and environment)."""

    api_key: str | None = None
    weight_sync_enabled: bool = True
    weight_sync_allowed_hosts: tuple = ()  # networks; empty = any host (when weight sync is enabled)
    max_body_bytes: int = int(DEFAULT_MAX_BODY_MB * 2**20)
    max_prompts: int = DEFAULT_MAX_PROMPTS
    max_completions: int = DEFAULT_MAX_COMPLETIONS

    def __post_init__(self):
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_request_body_mb must allow at least 1 KiB, got {self.max_body_bytes} bytes")
        if self.max_prompts < 1:
            raise ValueError(f"max_prompts_per_request must be >= 1, got {self.max_prompts}")
        if self.max_completions < 1:
            raise ValueError(f"max_completions_per_request must be >= 1, got {self.max_completions}")

    def is_host_allowed(self, host: str | None) -> bool:
        if not self.weight_sync_allowed_hosts:
            return True
        if host is None:
            return False
        try:
            address = ipaddress.ip_address(host)
        except ValueError:  # not an IP (a unix socket, a test client's name): never allowed by a list
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped  # ::ffff:10.0.0.5 is 10.0.0.5
        return any(address.version == n.version and address in n for n in self.weight_sync_allowed_hosts)

    def describe(self) -> str:
        """One line for the start-up log: what is open and what is not."""
        key = "API key required" if self.api_key else "no API key (every route open)"
        if not self.weight_sync_enabled:
            sync = "weight sync disabled"
        elif self.weight_sync_allowed_hosts:
            sync = "weight sync from " + ", ".join(str(n) for n in self.weight_sync_allowed_hosts)
        else:
            sync = "weight sync from any host"
        return (f"{key}; {sync}; request body <= {self.max_body_bytes:,} bytes, "
                f"<= {self.max_prompts:,} prompts and {self.max_completions:,} completions per request")


def security_config_from_args(args, environ=os.environ) -> SecurityConfig:
    api_key = getattr(args, "api_key", None)
    if api_key is None:
        api_key, source = api_key_from_env(environ)
        if source is not None:
            logger.info("API key from $%s", source)
    return SecurityConfig(
        api_key=api_key, weight_sync_enabled=not getattr(args, "disable_weight_sync", False),
        weight_sync_allowed_hosts=parse_allowed_hosts(getattr(args, "weight_sync_allowed_hosts", None)) or (),
        max_body_bytes=int(getattr(args, "max_request_body_mb", DEFAULT_MAX_BODY_MB) * 2**20),
        max_prompts=getattr(args, "max_prompts_per_request", DEFAULT_MAX_PROMPTS),
        max_completions=getattr(args, "max_completions_per_request", DEFAULT_MAX_COMPLETIONS))


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()  # equal-length inputs: compare_digest then leaks nothing, not even length


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer":
                return token.strip()
            return None
    return None


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


class SecurityMiddleware:
    """Pure ASGI (no BaseHTTPMiddleware: streaming responses and ``request.is_disconnected`` pass through)."""

    def __init__(self, app, config: SecurityConfig):
        self.app = app
        self.config = config
        self._key_digest = _digest(config.api_key.encode()) if config.api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan" or scope["path"].rstrip("/") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        try:
            self._admit(scope)
            if scope["type"] == "http":
                receive = self._bounded(scope, receive)
        except ServerError as e:
            if scope["type"] == "websocket":  # none today; one added later is refused the same way
                await send({"type": "websocket.close", "code": 1008, "reason": e.message[:120]})
            else:
                await server_error_response(e)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _admit(self, scope) -> None:
        headers = scope["headers"]
        client = scope.get("client")
        host = client[0] if client else None
        if self._key_digest is not None:
            token = _bearer_token(headers)
            if token is None or not hmac.compare_digest(_digest(token), self._key_digest):
                logger.info("401 %s %s from %s: %s API key", scope.get("method", "WS"), scope["path"], host,
                            "missing" if token is None else "wrong")
                raise Unauthorized("invalid or missing API key: send 'Authorization: Bearer <key>' (the key "
                                   "the server was started with, --api_key or $RLSERVE_API_KEY)")
        if is_weight_sync_path(scope["path"]):
            reason = None
            if not self.config.weight_sync_enabled:
                reason = "weight sync is disabled on this server (--disable_weight_sync)"
            elif not self.config.is_host_allowed(host):
                reason = (f"weight sync is not allowed from {host} (--weight_sync_allowed_hosts "
                          f"{','.join(str(n) for n in self.config.weight_sync_allowed_hosts)})")
            if reason is not None:
                logger.warning("403 %s %s from %s: %s", scope.get("method", "WS"), scope["path"], host, reason)
                raise Forbidden(reason)

    def _bounded(self, scope, receive):
        """``receive`` that never lets the app see more than ``max_body_bytes`` of body."""
        limit = self.config.max_body_bytes
        length = _header(scope["headers"], b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                raise BadRequest(f"Content-Length is not a number: {length[:40]!r}") from None
            if declared > limit:
                raise self._too_large(scope, f"of {declared:,} bytes ")
            return receive  # the HTTP parser delivers no more than Content-Length bytes
        received = 0

        async def bounded_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body read; FastAPI lets an HTTPException through to the app's
                    # handlers (errors.py), which answer 413 with the same message.
                    raise self._too_large(scope, "").as_http_exception()
            return message

        return bounded_receive

    def _too_large(self, scope, size: str) -> PayloadTooLarge:
        message = (f"request body {size}is over the server's limit of {self.config.max_body_bytes:,} bytes "
                   f"(--max_request_body_mb)")
        logger.warning("413 %s %s: %s", scope["method"], scope["path"], message)
        return PayloadTooLarge(message)


def check_num_prompts(request: Request, num_prompts: int, field: str, n: int = 1) -> None:
    """400 when a request carries more prompts, or asks for more completions (prompts x ``n``), than the server
    takes in one request."""
    config: SecurityConfig = getattr(request.app.state, "security", None) or SecurityConfig()
    if num_prompts > config.max_prompts:
        raise BadRequest(f"{field}: {num_prompts:,} prompts in one request, more than the server's limit of "
                         f"{config.max_prompts:,} (--max_prompts_per_request); split the batch", param=field)
    if num_prompts * n > config.max_completions:
        raise BadRequest(f"n: {num_prompts:,} prompts x n={n:,} = {num_prompts * n:,} completions in one request, "
                         f"more than the server's limit of {config.max_completions:,} "
                         f"(--max_completions_per_request); split the batch", param="n")
