"""Shapes every endpoint shares: the error object and list pages."""

from __future__ import annotations

from typing import Generic, Literal, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class FieldProblems(ValueError):
    """Several problems of one object, each naming its field (raised by model validators).

    The API's error edge reports each under its own field instead of under the object as a whole.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__("; ".join(f"{field}: {reason}" for field, reason in problems))
        self.problems = problems


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
