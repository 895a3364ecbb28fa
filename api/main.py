"""The FastAPI app factory."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.dispatch import DispatchLoop
from api.routes import adapters, files, health, inference, jobs, models
from core.errors import install_error_handlers
from core.settings import get_settings


def create_app() -> FastAPI:
    """Build the API: routes, the error edge, and the dispatcher in the background."""
    settings = get_settings()

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        loop = DispatchLoop(settings) if settings.run_dispatcher else None
        if loop:
            loop.start()
        yield
        if loop:
            loop.stop()

    app = FastAPI(title="Patchbay", version="0.1.0", lifespan=lifespan)
    install_error_handlers(app)
    for module in (health, files, jobs, models, adapters, inference):
        app.include_router(module.router)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return app
