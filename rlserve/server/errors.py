"""The one place where exceptions become HTTP statuses.

400 bad input (the message names the field and the limit), 404 unknown route or model, 409 state conflict,
503 while starting, draining, paused for shutdown or after the engine died, 500 only for real bugs. Bodies
are ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI shape, which the openai SDK parses).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class ServerError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(ServerError):
    status = 400
    type = "invalid_request_error"


class NotFound(ServerError):
    status = 404
    type = "not_found_error"


class Conflict(ServerError):
    status = 409
    type = "conflict_error"


class EngineUnavailable(ServerError):
    status = 503
    type = "service_unavailable"


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(status_code=status,
                        content={"error": {"message": message, "type": type_, "param": param, "code": status}})


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "bytes", "list", "dict", "none"})


def _field(loc) -> str:
    """``("body", "prompts", "list[list[int]]", 0, 1)`` -> ``prompts[0][1]``: pydantic's union-member tags
    (``list[str]``, ``str``) are not fields the caller wrote, so they are left out."""
    field = ""
    for part in loc:
        if part in ("body", "query", "path"):
            continue
        if isinstance(part, int):
            field += f"[{part}]"
        elif str(part).isidentifier() and part not in _TYPE_TAGS:
            field += f".{part}" if field else str(part)
    return field or "body"


def engine_started(request: Request) -> bool:
    engine = getattr(request.app.state, "engine", None)
    return engine is None or engine.ready.is_set()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError):
        if exc.status >= 500 and engine_started(request):
            logger.warning("%s %s -> %d: %s", request.method, request.url.path, exc.status, exc.message)
        return error_response(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        message = f"{field}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, "invalid_request_error", field)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        message = str(exc)
        return error_response(400, message, "invalid_request_error", message.split(" ", 1)[0].rstrip(":"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "error")
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
