"""The FastAPI application: routers, error handlers, and the engine's life cycle.

The engine replicas start in the background once uvicorn is up, so the server answers 503 while starting
instead of refusing connections; a replica that dies turns every answer into 503 and stops the server with a
non-zero exit code, so that a supervisor can restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import FastAPI

from rlserve.debug import GcPauses
from rlserve.server import routes_admin, routes_openai, routes_scoring, routes_trl, routes_weights
from rlserve.server.errors import install_error_handlers
from rlserve.server.security import SecurityConfig, SecurityMiddleware

logger = logging.getLogger("rlserve.server")


def create_app(engine, on_ready=None, on_fatal=None, startup_timeout_s: float = 900.0,
               security: SecurityConfig | None = None) -> FastAPI:
    """``security``: API key, weight-sync admission and request-size limits (default: no key, weight sync
    from anywhere, the default limits), enforced by one middleware in front of every route."""
    security = security or SecurityConfig()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async def start():
            try:
                await engine.start(startup_timeout_s)
            except Exception as e:
                logger.error("engine failed to start: %s", e)
                if on_fatal is not None:
                    on_fatal(f"engine failed to start: {e}")
                return
            if on_ready is not None:
                on_ready()

        engine.on_dead = lambda message: on_fatal(message) if on_fatal else None
        app.state.gc_pauses = GcPauses()  # the API process's own, in /server_info/ and /metrics
        app.state.start_task = asyncio.create_task(start())
        yield
        app.state.start_task.cancel()
        app.state.gc_pauses.close()
        await engine.shutdown()

    app = FastAPI(title="rlserve", lifespan=lifespan)
    app.state.engine = engine
    app.state.draining = False
    app.state.weight_sync_init = None
    app.state.metrics = routes_admin.make_metrics_registry(engine, app)
    app.state.security = security
    app.state.weight_sync_enabled = security.weight_sync_enabled  # False: server_info reports no transfer config
    install_error_handlers(app)
    app.add_middleware(SecurityMiddleware, config=security)
    for module in (routes_trl, routes_scoring, routes_openai, routes_weights, routes_admin):
        app.include_router(module.router)
    return app
