"""The one place where exceptions become HTTP statuses.

400 bad input (the message names the field and the limit), 401 missing or wrong API key, 403 a weight-sync call
the server does not admit, 404 unknown route or model, 409 state conflict, 413 request body over the limit,
503 while starting, draining, paused for shutdown or after the engine died, 500 only for real bugs. Bodies
are ``{"error": {"message", "type", "param", "code"}}`` (the OpenAI shape, which the openai SDK parses).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from rlserve.engine.validation import InvalidRequest

logger = logging.getLogger(__name__)


class ServerError(Exception):
    status = 500
    type = "internal_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def as_http_exception(self) -> StarletteHTTPException:
        """The same error as an HTTPException, for code that runs inside FastAPI's body parsing (which turns
        any other exception into a 400); the handler below answers it with this class's type."""
        return StarletteHTTPException(self.status, self.message)


class BadRequest(ServerError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(ServerError):
    status = 401
    type = "authentication_error"


class Forbidden(ServerError):
    status = 403
    type = "permission_error"


class NotFound(ServerError):
    status = 404
    type = "not_found_error"


class Conflict(ServerError):
    status = 409
    type = "conflict_error"


class PayloadTooLarge(ServerError):
    status = 413
    type = "request_too_large"


class EngineUnavailable(ServerError):
    status = 503
    type = "service_unavailable"


_TYPE_OF_STATUS = {cls.status: cls.type for cls in (BadRequest, Unauthorized, Forbidden, NotFound, Conflict,
                                                    PayloadTooLarge, EngineUnavailable)}
_TYPE_OF_STATUS[405] = "invalid_request_error"


def error_response(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": type_, "param": param, "code": status}})


def server_error_response(exc: ServerError) -> JSONResponse:
    """The response of a ServerError (also for middleware, which runs outside the handlers below)."""
    return error_response(exc.status, exc.message, exc.type, exc.param)


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
        return server_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
        field = _field(first.get("loc", ()))
        message = f"{field}: {first.get('msg', 'invalid value')}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        return error_response(400, message, "invalid_request_error", field)

    @app.exception_handler(InvalidRequest)
    async def invalid_request(request: Request, exc: InvalidRequest):
        return error_response(400, exc.message, "invalid_request_error", exc.field)

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError):
        message = str(exc)
        return error_response(400, message, "invalid_request_error", message.split(" ", 1)[0].rstrip(":"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        type_ = _TYPE_OF_STATUS.get(exc.status_code, "error")
        return error_response(exc.status_code, str(exc.detail), type_)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", "internal_error")
