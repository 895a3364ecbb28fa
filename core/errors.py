"""The one error edge: every failure leaves as OpenAI's error object with a fitting status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.schemas.common import FieldProblems

log = logging.getLogger("patchbay.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


class ApiError(Exception):
    """An error a client caused or must hear about."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """404 for an unknown id, or one that belongs to another team."""
    return ApiError(404, f"No {kind} found with id '{object_id}'.", param=param, code="not_found")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """400 for input that cannot be accepted."""
    return ApiError(400, message, param=param, code=code)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error object as a response."""
    body = {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    # Pydantic adds the union branch ("int", "literal['auto']") to the path; it names no field.
    union_branches = ("int", "float", "str", "list[str]")
    parts = [p for p in parts if not p.startswith(("literal[", "function-")) and p not in union_branches]
    return ".".join(parts) or None


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None]:
    seen: dict[str, str] = {}
    for err in exc.errors():
        param = _loc_to_param(tuple(err.get("loc", ())))
        key = param or "body"
        msg = str(err.get("msg", "invalid"))
        problems = (err.get("ctx") or {}).get("error")
        if isinstance(problems, FieldProblems):
            for field, reason in problems.problems:
                seen.setdefault(field, reason)
            continue
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unrecognized field"
        seen.setdefault(key, msg)
    first = next(iter(seen), None)
    listed = "; ".join(f"{k}: {v}" for k, v in seen.items())
    return f"Invalid request ({len(seen)} problem(s)): {listed}", (first if first != "body" else None)


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the error object."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _describe_validation(exc)
        return error_response(400, message, param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "The server had an error while processing your request.", None, "internal_error")
