"""`patchbay models`: register local model folders as base models."""

from __future__ import annotations

from pathlib import Path

import typer

models_app = typer.Typer(help="Manage base models.", no_args_is_help=True)


@models_app.command("add")
def models_add(model_id: str, path: Path) -> None:
    """Register a local Hugging Face model folder as a base model."""
    from core.base_models import BaseModelError, register_base_model
    from core.db import session_scope

    try:
        with session_scope() as session:
            record = register_base_model(session, model_id, path)
            typer.echo(f"registered {record.id} -> {record.path} (sha256 {record.sha256[:12]}…)")
    except BaseModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
