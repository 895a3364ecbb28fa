"""The FastAPI app factory."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from api.console.routes import install_console
from api.dispatch import DispatchLoop
from api.edge import AsgiEdge
from api.metrics import RequestMetrics
from api.metrics import router as metrics_router
from api.openapi import install_openapi
from api.ratelimit import RateLimits
from api.routes import adapters, admin, api_keys, files, fleet, health, identity, inference, jobs, models, replicas
from api.upstream_client import close_upstream_client
from core.errors import install_error_handlers
from core.periodic import Periodic
from core.settings import Settings, get_settings
from core.storage import get_storage, report_storage
from core.temporaries import sweep


class PatchbayApi(FastAPI):
    """FastAPI wrapped in our ASGI edge (request ids, bounded bodies, sane connections), and the request metrics
    around both."""

    def __init__(self, settings: Settings, **kwargs) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    def build_middleware_stack(self):
        edge = AsgiEdge(super().build_middleware_stack(), self.settings)
        return RequestMetrics(edge, lambda: self.openapi().get("paths", {}))


def create_app() -> FastAPI:
    """Build the API: routes, the error edge, the dispatcher and the orphan sweep in the background."""
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await run_in_threadpool(report_storage)
        loops = [Periodic("patchbay-sweep", settings.sweep_interval_seconds, lambda: sweep(get_storage(), settings))]
        if settings.run_dispatcher:
            loops.append(DispatchLoop(settings))
        for loop in loops:
            loop.start()
        yield
        for loop in loops:
            loop.stop()
        await close_upstream_client()

    app = PatchbayApi(settings, title="Patchbay", version="0.1.0", lifespan=lifespan)
    app.state.rate_limits = RateLimits()
    install_error_handlers(app)
    install_openapi(app)
    for module in (health, identity, files, jobs, models, adapters, inference, replicas, fleet, admin, api_keys):
        app.include_router(module.router)
    if settings.metrics_enabled:
        app.include_router(metrics_router)
    install_console(app)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app
