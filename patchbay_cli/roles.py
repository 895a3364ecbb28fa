"""The commands that run Patchbay's roles: migrate, api, worker, inference, serve and demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

app = typer.Typer(help="Patchbay: self-hosted fine-tuning and multi-adapter serving.", no_args_is_help=True)

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
    exe = [sys.executable, "-m", "patchbay_cli"]
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

