"""Route registration with the trailing slash optional, and access to the app's engine client."""

from __future__ import annotations

from fastapi import APIRouter, Request


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
