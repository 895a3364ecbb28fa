"""`patchbay storage`: check the configured object storage (and create its bucket, for a fresh deployment)."""

from __future__ import annotations

import time

import typer

storage_app = typer.Typer(help="Check the configured object storage.", no_args_is_help=True)


@storage_app.command("check")
def storage_check(
    create_bucket: bool = typer.Option(False, help="create the S3 bucket when it does not exist"),
    wait: float = typer.Option(0.0, help="keep trying this many seconds while the store is unreachable"),
) -> None:
    """Exit 0 when storage is usable; else print why and exit 2."""
    from core.storage import StorageUnavailable, get_storage

    storage = get_storage()
    deadline = time.monotonic() + wait
    while True:
        try:
            if create_bucket and hasattr(storage, "create_bucket"):
                storage.create_bucket()
            storage.check()
            typer.echo(f"storage ok: {storage!r}")
            return
        except StorageUnavailable as exc:
            if time.monotonic() >= deadline:
                typer.echo(f"error: {exc}", err=True)
                raise typer.Exit(2) from None
            time.sleep(1)
