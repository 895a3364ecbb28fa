"""The `patchbay` command line: run roles, migrate, manage teams and base models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import typer

app = typer.Typer(help="Patchbay: self-hosted fine-tuning and multi-adapter serving.", no_args_is_help=True)
team_app = typer.Typer(help="Manage teams and their API keys.", no_args_is_help=True)
models_app = typer.Typer(help="Manage base models.", no_args_is_help=True)
app.add_typer(team_app, name="team")
app.add_typer(models_app, name="models")

HostOption = typer.Option("127.0.0.1", help="address to bind")
PortOption = typer.Option(8000, help="port to bind")


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema (alembic upgrade head)."""
    from core.migrate import upgrade_head

    upgrade_head()
    typer.echo("database is at the newest revision")


@app.command()
def api(host: str = HostOption, port: int = PortOption) -> None:
    """Run the HTTP API (with the outbox dispatcher and reconciler)."""
    import uvicorn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    uvicorn.run("api.main:create_app", factory=True, host=host, port=port, log_level="info")


@app.command()
def inference(host: str = HostOption, port: int = typer.Option(8001, help="port to bind")) -> None:
    """Run the multi-adapter inference server (OpenAI-compatible) on the configured base model."""
    import uvicorn

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    uvicorn.run("worker.inference.server:create_inference_app", factory=True, host=host, port=port,
                log_level="info")


@app.command()
def worker(concurrency: int = typer.Option(None, help="jobs run at once (default: settings)")) -> None:
    """Run a training worker on the `train` queue."""
    from core.queue import TRAIN_QUEUE
    from core.settings import get_settings
    from worker.celery_app import app as celery_app

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    concurrency = concurrency or get_settings().worker_concurrency
    celery_app.worker_main([
        "worker", "--queues", TRAIN_QUEUE, "--concurrency", str(concurrency), "--pool", "prefork",
        "--max-tasks-per-child", "1", "--loglevel", "INFO", "--without-gossip", "--without-mingle",
    ])


@team_app.command("create")
def team_create(name: str, admin: bool = typer.Option(False, help="the key may manage adapters at runtime")) -> None:
    """Create a team (or reuse it) and print a new API key on stdout."""
    from core.auth import create_api_key, create_team
    from core.db import session_scope

    with session_scope() as session:
        team = create_team(session, name)
        key = create_api_key(session, team, is_admin=admin)
    typer.echo(key)


def _limit_value(text: str | None) -> int | None:
    return None if text in (None, "default") else int(text)


@team_app.command("limits")
def team_limits(
    name: str,
    max_running_jobs: str = typer.Option(None, help="jobs training at once (0: unlimited, 'default')"),
    max_queued_jobs: str = typer.Option(None, help="jobs waiting to train (0: unlimited, 'default')"),
    storage_bytes: str = typer.Option(None, help="bytes of files and adapters (0: unlimited, 'default')"),
    requests_per_minute: str = typer.Option(None, help="inference requests per minute (0: unlimited, 'default')"),
    tokens_per_minute: str = typer.Option(None, help="generated tokens per minute (0: unlimited, 'default')"),
) -> None:
    """Show a team's limits, or override some ('default' puts one back to the settings' value)."""
    import json

    from sqlalchemy import select

    from core.db import session_scope
    from core.models import Team
    from core.quotas import LIMIT_NAMES, describe_limits, set_team_limits
    from core.settings import get_settings

    given = dict(zip(LIMIT_NAMES, (max_running_jobs, max_queued_jobs, storage_bytes, requests_per_minute,
                                   tokens_per_minute)))
    try:
        changes = {limit: _limit_value(value) for limit, value in given.items() if value is not None}
        with session_scope() as session:
            team = session.scalar(select(Team).where(Team.name == name))
            if team is None:
                raise ValueError(f"no team named {name!r}")
            set_team_limits(session, team, changes)
            shown = describe_limits(session, team, get_settings())
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(shown, indent=2))


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


def _default_key() -> str:
    """The default team's key, created once and kept in the data dir for local use."""
    from core.auth import create_api_key, create_team
    from core.db import session_scope
    from core.settings import get_settings

    settings = get_settings()
    key_file = settings.data_dir / "default_api_key"
    if key_file.exists():
        return key_file.read_text().strip()
    with session_scope() as session:
        key = create_api_key(session, create_team(session, settings.default_team), is_admin=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


@app.command()
def serve(host: str = HostOption, port: int = PortOption,
          inference_port: int = typer.Option(8001, help="port of the inference server")) -> None:
    """Run the API, a training worker and the inference server as child processes."""
    from core.migrate import upgrade_head
    from core.settings import get_settings
    from worker.base_models import DEFAULT_BASE_MODEL, ensure_default_base_model

    upgrade_head()
    key = _default_key()
    if get_settings().inference_base_model == DEFAULT_BASE_MODEL:
        typer.echo("preparing the default base model (converted once, then reused)…")
        ensure_default_base_model(get_settings().data_dir)
    exe = [sys.executable, "-m", "core.cli"]
    env = {**os.environ, "PATCHBAY_INFERENCE_URL": os.environ.get(
        "PATCHBAY_INFERENCE_URL", f"http://127.0.0.1:{inference_port}")}
    children = [
        subprocess.Popen([*exe, "api", "--host", host, "--port", str(port)], env=env),
        subprocess.Popen([*exe, "worker"], env=env),
        subprocess.Popen([*exe, "inference", "--host", "127.0.0.1", "--port", str(inference_port)], env=env),
    ]
    typer.echo(f"\nPatchbay is starting at http://{host}:{port}/v1\nAPI key (team 'default'): {key}\n")

    def _stop(*_):
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
        raise typer.Exit(0)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    while all(child.poll() is None for child in children):
        time.sleep(0.5)
    typer.echo("a child process exited; stopping the others", err=True)
    _stop()


@app.command()
def demo(url: str = typer.Option("http://127.0.0.1:8000", help="a running Patchbay"),
         key: str = typer.Option(None, help="API key (default: the one `patchbay serve` created)")) -> None:
    """Fine-tune SmolLM2 on the shipped dataset and compare the adapter with the base."""
    from core.settings import get_settings
    from demo.runner import run_demo

    key = key or (get_settings().data_dir / "default_api_key").read_text().strip()
    result = run_demo(url, key)
    if result.adapter_rate < 0.8 or result.base_rate > 0.1:
        typer.echo("the adapter did not clearly learn the behaviour", err=True)
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
