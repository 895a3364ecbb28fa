"""An inference server on the embedded stores (no Redis: it polls the registry's change feed) follows the registry.

Seen through its own status endpoint: a deleted adapter is unloaded within two polling periods, and the
new version of a moved alias, or a new version of a resident name, is loaded ahead of its first request.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.support.adapters import save_peft_lora, tar_gz
from tests.support.services import embedded_urls, free_port, make_stack

pytestmark = pytest.mark.slow
POLL_SECONDS = 1.5


def _resident(port: int) -> dict[str, dict]:
    return httpx.get(f"http://127.0.0.1:{port}/internal/status", timeout=10).json()["adapters"]


def _within(seconds: float, condition) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"the inference server did not follow the registry within {seconds} s"
        time.sleep(0.05)


def test_polling_server_unloads_deleted_adapters_and_preloads_moved_aliases(tmp_path, tiny_model_dir):
    port = free_port()
    stack = make_stack(tmp_path, *embedded_urls(tmp_path), tiny_model_dir, PATCHBAY_INFERENCE_BASE_MODEL="tiny-llama",
                       PATCHBAY_INFERENCE_URL=f"http://127.0.0.1:{port}",
                       PATCHBAY_REGISTRY_POLL_SECONDS=str(POLL_SECONDS))
    try:
        stack.start_api()
        stack.start_inference(port)
        with stack.client() as client:
            versions = []
            for seed in (1, 2):
                folder = save_peft_lora(tiny_model_dir, tmp_path / f"v{seed}", seed=seed)
                imported = client.post("/v1/adapters/import", data={"name": "bot", "base_model": "tiny-llama"},
                                       files={"file": ("a.tar.gz", tar_gz(folder))})
                assert imported.status_code == 200, imported.text
                versions.append(imported.json()["id"])
            v1, v2 = versions
            time.sleep(2 * POLL_SECONDS)  # the server has read both `published` changes while nothing was resident
            client.post("/v1/adapters/bot/aliases", json={"alias": "prod", "version": 1}).raise_for_status()
            reply = client.post("/v1/chat/completions", json={
                "model": "bot:prod", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert reply.status_code == 200, reply.text
            assert set(_resident(port)) == {v1}

            client.post("/v1/adapters/bot/aliases", json={"alias": "prod", "version": 2}).raise_for_status()
            _within(2 * POLL_SECONDS, lambda: v2 in _resident(port))  # no request asked for v2
            _within(60, lambda: _resident(port)[v2]["state"] == "ready")

            assert client.delete(f"/v1/adapters/{v1}").status_code == 200
            _within(2 * POLL_SECONDS, lambda: v1 not in _resident(port))  # no alias pointed at v1 any more

            folder = save_peft_lora(tiny_model_dir, tmp_path / "v3", seed=3)
            imported = client.post("/v1/adapters/import", data={"name": "bot", "base_model": "tiny-llama"},
                                   files={"file": ("a.tar.gz", tar_gz(folder))})
            assert imported.status_code == 200, imported.text
            v3 = imported.json()["id"]
            _within(2 * POLL_SECONDS, lambda: v3 in _resident(port))  # `bot` now names v3, and v2 is resident

            assert client.delete("/v1/models/bot:prod").status_code == 200  # v2, through the models route
            assert client.delete(f"/v1/adapters/{v3}").status_code == 200
            _within(2 * POLL_SECONDS, lambda: _resident(port) == {})
    except BaseException:
        print(stack.logs())
        raise
    finally:
        stack.stop()
