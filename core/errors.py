"""The one error edge: every failure leaves as OpenAI's error object with a fitting status."""

from __future__ import annotations

import logging
import re

import sqlalchemy.exc as sa_exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.schemas.common import FieldProblems
from core.stores import OUTAGES, StoreUnavailable, store_outage

log = logging.getLogger("patchbay.errors")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}
RETRY_AFTER_SECONDS = 2
"""What a 503 for a store outage tells clients to wait before retrying."""


class ApiError(Exception):
    """An error a client caused or must hear about.

    `headers` travel with the response (Retry-After, rate-limit headers); `extra` adds fields to the
    error object (a quota's `limit` and `current` use, say).
    """

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def not_found(kind: str, object_id: str, param: str | None = None) -> ApiError:
    """404 for an unknown id, or one that belongs to another team."""
    return ApiError(404, f"No {kind} found with id '{object_id}'.", param=param, code="not_found")


def invalid(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    """400 for input that cannot be accepted."""
    return ApiError(400, message, param=param, code=code)


def invalid_all(problems: list[ApiError]) -> ApiError:
    """One 400 for several invalid fields: the first names `param`, and `errors` lists every one."""
    if len(problems) == 1:
        return problems[0]
    listed = "; ".join(f"{p.param}: {p.message}" for p in problems)
    return ApiError(400, f"Invalid request ({len(problems)} problem(s)): {listed}", param=problems[0].param,
                    code="invalid_request",
                    extra={"errors": [{"param": p.param, "message": p.message, "code": p.code} for p in problems]})


def unavailable(message: str, code: str = "store_unavailable", retry_after: float = RETRY_AFTER_SECONDS) -> ApiError:
    """503 with Retry-After: something the request needs is down for now."""
    return ApiError(503, message, code=code, headers={"Retry-After": str(max(1, round(retry_after)))})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               extra: dict | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error"), "param": param, "code": code,
                      **(extra or {})}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None, extra: dict | None = None) -> JSONResponse:
    """The error object as a response."""
    return JSONResponse(error_body(status, message, param, code, extra), status_code=status, headers=headers)


def _api_error_response(exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers, exc.extra)


# Pydantic adds the branch of a union or constrained type ("int", "literal['auto']", "list[constrained-str]")
# to an error's location; it names no field.
_TYPE_TAG = re.compile(r"^(int|float|str|bool|none|constrained-\w+|(literal|list|dict|tuple|json-or-python)\[.*\]|"
                       r"function-\w+.*)$")


def _loc_to_param(loc: tuple) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(p for p in parts if not _TYPE_TAG.match(p)) or None


def _describe_validation(exc: RequestValidationError) -> tuple[str, str | None, list[dict]]:
    seen: dict[str, str] = {}
    for err in exc.errors():
        param = _loc_to_param(tuple(err.get("loc", ())))
        key = param or "body"
        msg = str(err.get("msg", "invalid"))
        problems = (err.get("ctx") or {}).get("error")
        if isinstance(problems, FieldProblems):
            for field, reason in problems.problems:
                # A nested model names its fields relative to itself (hyperparameters' `n_epochs`).
                absolute = field if key == "body" or field.startswith(f"{key}.") else f"{key}.{field}"
                seen.setdefault(absolute, reason)
            continue
        if err.get("type") == "json_invalid":
            msg = "the body is not valid JSON"
        elif err.get("type") == "extra_forbidden":
            msg = "unrecognized field"
        seen.setdefault(key, msg)
    first = next(iter(seen), None)
    listed = "; ".join(f"{k}: {v}" for k, v in seen.items())
    problems = [{"param": None if k == "body" else k, "message": v} for k, v in seen.items()]
    return f"Invalid request ({len(seen)} problem(s)): {listed}", (first if first != "body" else None), problems


def request_id_of(request: Request) -> str | None:
    """The id the ASGI edge gave this request (also sent as `x-request-id`)."""
    return request.scope.get("state", {}).get("request_id")


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers that turn every exception into the error object."""

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _api_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, problems = _describe_validation(exc)
        return error_response(400, message, param, "invalid_request", extra={"errors": problems})

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, None, headers=exc.headers)

    async def _outage(request: Request, exc: Exception) -> JSONResponse:
        what = store_outage(exc) or "A store is unavailable"
        log.warning("%s (request %s): %s: %s", what, request_id_of(request), type(exc).__name__, exc)
        return _api_error_response(unavailable(f"{what}. Retry shortly."))

    for kind in (StoreUnavailable, *OUTAGES):
        app.add_exception_handler(kind, _outage)

    @app.exception_handler(sa_exc.DataError)
    async def _data_error(request: Request, exc: sa_exc.DataError) -> JSONResponse:
        # Input validation should catch these first; this is the net under it.
        log.warning("database refused a value (request %s): %s", request_id_of(request), exc.orig)
        return error_response(400, "A value in the request cannot be stored (out of range or malformed).",
                              None, "invalid_value")

    @app.exception_handler(sa_exc.IntegrityError)
    async def _conflict(request: Request, exc: sa_exc.IntegrityError) -> JSONResponse:
        log.warning("write conflict (request %s): %s", request_id_of(request), exc.orig)
        return error_response(409, "The request conflicted with a concurrent change; retry it.", None, "conflict")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if store_outage(exc) is not None:
            return await _outage(request, exc)
        request_id = request_id_of(request)
        log.exception("unhandled error (request %s)", request_id)
        return error_response(500, f"The server had an error while processing your request (request id "
                                   f"{request_id}). Retry, and quote the id if it persists.", None, "internal_error")
