"""Route registration with the trailing slash optional, and access to the app's engine client."""

from __future__ import annotations

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response


def route(router: APIRouter, method: str, path: str, **kwargs):
    """Register ``fn`` at ``path`` with and without its trailing slash (no redirects: POST bodies survive)."""
    def register(fn):
        main = path if path.endswith("/") else path + "/"
        router.add_api_route(main, fn, methods=[method], **kwargs)
        router.add_api_route(main.rstrip("/"), fn, methods=[method], include_in_schema=False, **kwargs)
        return fn
    return register


def engine_of(request: Request):
    return request.app.state.engine


def json_response(payload: dict) -> Response:
    """Serialise a (large) response body directly: an RL batch carries ~10 MB of token ids and logprobs,
    which FastAPI's default encoder walks element by element in Python. Non-finite floats become null."""
    return Response(orjson.dumps(payload), media_type="application/json")


def tokenize_prompts(engine, prompts: list, field: str) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt: texts through the tokenizer, token-id lists as they are. An
    empty prompt is a 400 naming ``field`` and its index."""
    from rlserve.server.errors import BadRequest
    items = []
    for i, p in enumerate(prompts):
        if not p:
            raise BadRequest(f"{field}[{i}]: prompt must not be empty", param=field)
        if isinstance(p, str):
            items.append((p, engine.tokenizer(p).input_ids))
        else:
            items.append((None, list(p)))
    return items
