"""Routes of the console: `/` is its page, `/console/static/…` its own files, `/console/vendor/…` libraries."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from api.console.vendor import PLOTLY_JS, gzipped, package_file

STATIC_DIR = Path(__file__).parent / "static"
# Our own scripts only; plotly.js draws with inline styles, so styles may be inline.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
PAGE_HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}

router = APIRouter(include_in_schema=False)


@router.get("/")
async def console_page() -> FileResponse:
    """The console's single page (its routes live after `#`)."""
    return FileResponse(STATIC_DIR / "index.html", headers=PAGE_HEADERS)


@router.get("/console/vendor/plotly.min.js")
async def plotly_js(request: Request) -> Response:
    """plotly.js from the installed `plotly` package, gzip-compressed when the browser accepts it."""
    path = package_file(*PLOTLY_JS)
    headers = {"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff", "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("accept-encoding", ""):
        body = await run_in_threadpool(gzipped, path)
        return Response(body, media_type="text/javascript", headers={**headers, "Content-Encoding": "gzip"})
    return FileResponse(path, media_type="text/javascript", headers=headers)


class ConsoleFiles(StaticFiles):
    """The console's own files, revalidated on every load so an upgrade shows at once."""

    def file_response(self, *args, **kwargs) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update({"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})
        return response


def install_console(app: FastAPI) -> None:
    """Serve the console from this app."""
    app.include_router(router)
    app.mount("/console/static", ConsoleFiles(directory=STATIC_DIR), name="console-static")
