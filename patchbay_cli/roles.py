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


INFERENCE_ENGINES = ("patchbay", "vllm")
ENGINE_APPS = {
    "patchbay": "worker.inference.server:create_inference_process_app",
    "vllm": "worker.inference.vllm.app:create_vllm_process_app",
}


@app.command()
def inference(
    host: str = HostOption,
    port: int = typer.Option(8001, help="port to bind"),
    base_model: str = typer.Option(None, help="base model to serve (default: PATCHBAY_INFERENCE_BASE_MODEL)"),
    engine: str = typer.Option(None, help="patchbay or vllm (default: PATCHBAY_INFERENCE_ENGINE)"),
    advertise_url: str = typer.Option(None, help="URL the API reaches this replica at (default: http://HOST:PORT)"),
) -> None:
    """Run one inference replica of a base model; it registers in the database, so the API routes to it."""
    import uvicorn

    from core.settings import get_settings
    from worker.inference.presence import advertised_url

    if engine is not None and engine not in INFERENCE_ENGINES:
        raise typer.BadParameter(f"choose one of {', '.join(INFERENCE_ENGINES)}", param_hint="--engine")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _set_env(PATCHBAY_INFERENCE_BASE_MODEL=base_model, PATCHBAY_INFERENCE_ENGINE=engine,
             PATCHBAY_INFERENCE_ADVERTISE_URL=advertise_url)
    _set_env(PATCHBAY_INFERENCE_ADVERTISE_URL=advertised_url(get_settings(), host, port))
    settings = get_settings()
    if settings.inference_engine == "vllm":
        try:
            from worker.inference.vllm.environment import require_vllm

            require_vllm()
        except Exception as exc:  # vLLM missing or unusable: its plain message, no traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
    uvicorn.run(ENGINE_APPS[settings.inference_engine], factory=True, host=host, port=port, log_level="info")


def _set_env(**values: str | None) -> None:
    """Set the given PATCHBAY_* variables (None: leave as they are) and let the settings read them again."""
    from core.settings import get_settings

    os.environ.update({name: value for name, value in values.items() if value is not None})
    get_settings.cache_clear()


@app.command()
def worker(concurrency: int = typer.Option(None, help="jobs run at once (default: settings)")) -> None:
    """Run a training worker on the `train` queue (re-executed once on tcmalloc, see `worker.allocator`)."""
    from core.settings import get_settings
    from worker.allocator import reexec_with_allocator

    reexec_with_allocator(get_settings().worker_allocator)
    from core.queue import TRAIN_QUEUE
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
          inference_port: int = typer.Option(8001, help="port of the first inference replica (the next free ports "
                                             "for the other bases)")) -> None:
    """Run the API, a training worker and one inference replica per base model as child processes."""
    from core.migrate import upgrade_head
    from core.settings import get_settings
    from patchbay_cli.local_fleet import (
        LocalReplica,
        ReadinessWatch,
        probe_host,
        replica_ports,
        replica_threads_env,
    )
    from worker.base_models import DEFAULT_BASE_MODEL, ensure_default_base_model

    upgrade_head()
    key = _default_key()
    settings = get_settings()
    bases = settings.serve_base_model_ids
    if DEFAULT_BASE_MODEL in bases:
        typer.echo("preparing the default base model (converted once, then reused)…")
        ensure_default_base_model(settings.data_dir)
    _require_registered(bases)
    replicas = [LocalReplica(base, p) for base, p in zip(bases, replica_ports(inference_port, len(bases)))]
    exe = [sys.executable, "-m", "patchbay_cli"]
    env = dict(os.environ)  # the replicas register in the database; a user's PATCHBAY_INFERENCE_URL stays
    children = [
        subprocess.Popen([*exe, "api", "--host", host, "--port", str(port)], env=env),
        subprocess.Popen([*exe, "worker"], env=env),
        *(subprocess.Popen([*exe, "inference", "--host", "127.0.0.1", "--port", str(r.port), "--base-model",
                            r.base_model, "--advertise-url", r.url], env={**env, **replica_threads_env(len(replicas))})
          for r in replicas),
    ]
    api_url = f"http://{probe_host(host)}:{port}"
    typer.echo(f"\nPatchbay is starting at http://{host}:{port}/v1\n"
               f"Console: http://{host}:{port}/ (sign in with the key)\nAPI key (team 'default'): {key}\n"
               + "".join(f"inference replica of {r.base_model} on port {r.port}\n" for r in replicas))

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
    watch = ReadinessWatch(api_url, replicas, typer.echo)
    while all(child.poll() is None for child in children):
        if not watch.ready and watch.check():
            typer.echo(f"Patchbay is ready at http://{host}:{port}/v1 ({', '.join(bases)} loaded); "
                       f"console at http://{host}:{port}/")
        time.sleep(0.5)
    typer.echo("a child process exited; stopping the others", err=True)
    _stop()


def _require_registered(bases: list[str]) -> None:
    """Stop with a plain message when a base model to serve is not registered."""
    from core.db import session_scope
    from core.models import BaseModelRecord

    with session_scope() as session:
        missing = [base for base in bases if session.get(BaseModelRecord, base) is None]
    if missing:
        typer.echo(f"error: base model(s) {', '.join(missing)} not registered (patchbay models add ID PATH)", err=True)
        raise typer.Exit(2)


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

