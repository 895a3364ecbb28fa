"""Shapes every endpoint shares: the error object and list pages."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """`{"error": {...}}`."""

    error: ErrorBody


class ListPage(BaseModel, Generic[T]):
    """A page of a list endpoint."""

    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class DeletedObject(BaseModel):
    """The answer to a DELETE."""

    id: str
    object: str
    deleted: bool = True
