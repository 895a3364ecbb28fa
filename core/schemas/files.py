"""File objects, in OpenAI's shape."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from core.models import File


class FilePublic(BaseModel):
    """An uploaded file as clients see it."""

    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: Literal["uploaded", "processed", "error"]
    status_details: str | None = None
    sha256: str | None = None
    format: str | None = None
    n_examples: int = 0

    @classmethod
    def of(cls, row: File) -> "FilePublic":
        """Render a File row."""
        return cls(
            id=row.id,
            bytes=row.bytes,
            created_at=int(row.created_at),
            filename=row.filename,
            purpose=row.purpose,
            status=row.status,
            status_details=row.status_details,
            sha256=row.sha256,
            format=row.format,
            n_examples=row.n_examples,
        )


class FileLine(BaseModel):
    """One line of a file, cut at 4000 characters, with the validator's reason when it is invalid."""

    line: int
    text: str
    error: str | None = None


class FilePreviewPublic(BaseModel):
    """`GET /v1/files/{id}/preview`: the first lines, and up to 20 invalid lines wherever they are."""

    object: Literal["file.preview"] = "file.preview"
    id: str
    format: str | None
    status: str
    n_errors: int = Field(description="invalid lines in the whole file, from its validation")
    rows: list[FileLine]
    invalid_rows: list[FileLine]
    truncated: bool = Field(description="the file goes on after the last line read")
