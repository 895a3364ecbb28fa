"""The OpenAPI schema as the API really answers: OpenAI's error object with 400 (never FastAPI's 422), and
every error status a route can give, so generated clients and schemathesis agree with the server."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from core.schemas.common import ErrorResponse

ERROR_REF = "#/components/schemas/ErrorResponse"
_MEANINGS = {
    400: "Invalid input; `param` names the field.",
    401: "Missing or incorrect API key.",
    403: "The endpoint needs an admin key.",
    404: "Unknown id, or another team's.",
    408: "The request body stalled past the idle timeout.",
    409: "Conflicts with the object's state.",
    413: "The body, or the team's storage, is over its limit.",
    429: "Rate limited or at a team limit; see Retry-After and the x-ratelimit-* headers.",
    502: "The inference server gave an unreadable answer.",
    503: "A store or the inference server is unavailable; see Retry-After.",
}


def error_responses(*statuses: int) -> dict[int, dict]:
    """`responses=` for a route that can also answer these error statuses."""
    return {status: {"description": _MEANINGS[status], "model": ErrorResponse} for status in statuses}


def _document(operation: dict, method: str, path: str) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    statuses = {400, 401, 429, 503} if path.startswith("/v1/") else set()
    if method in ("post", "put", "patch"):
        statuses |= {408, 413}
    if method in ("post", "put", "patch", "delete") and path.startswith("/v1/"):
        statuses.add(409)  # a conflicting concurrent change, or the object's state
    if "{" in path:
        statuses.add(404)
    for status in sorted(statuses):
        responses.setdefault(str(status), {"description": _MEANINGS[status],
                                           "content": {"application/json": {"schema": {"$ref": ERROR_REF}}}})


def install_openapi(app: FastAPI) -> None:
    """Replace the app's schema generator with one that documents our errors."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            error = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(error.pop("$defs", {}))
            components["ErrorResponse"] = error
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for path, operations in schema.get("paths", {}).items():
                for method, operation in operations.items():
                    _document(operation, method, path)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
