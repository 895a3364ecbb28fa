"""patchbay_cli/local_fleet.py: the replicas' ports, their share of the cores, and when `serve` is ready."""

from __future__ import annotations

import os
import socket

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from patchbay_cli.local_fleet import LocalReplica, ReadinessWatch, replica_ports, replica_threads_env
from tests.support.live_server import live_server
from tests.support.services import free_port


def test_replica_ports_skip_ports_in_use():
    first = free_port()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first + 1))
        ports = replica_ports(first, 3)
    assert ports[0] == first and first + 1 not in ports and len(set(ports)) == 3


def test_replicas_share_the_cores_unless_the_user_chose(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert replica_threads_env(1) == {}
    assert replica_threads_env(2) == {"OMP_NUM_THREADS": "4"}
    assert replica_threads_env(16) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert replica_threads_env(2) == {}


def test_ready_only_once_the_api_and_every_replica_answer():
    loaded = {"value": False}
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        return JSONResponse({}, status_code=200 if loaded["value"] else 503)

    said: list[str] = []
    with live_server(app) as url:
        port = int(url.rsplit(":", 1)[1])
        watch = ReadinessWatch(url, [LocalReplica("tiny", port)], said.append)
        assert not watch.check()
        assert watch.waiting_for() == [f"base model tiny is loading (port {port})"]
        loaded["value"] = True
        assert watch.check() and watch.ready
        loaded["value"] = False
        assert watch.check()  # once ready, it stays ready
