"""Rate limits shared through Redis by two API processes, and the openai client's own retry getting through."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import OpenAI

from tests.support.services import free_port, make_stack

pytestmark = pytest.mark.slow


def test_two_api_processes_share_one_count_and_the_openai_client_retries_through(tmp_path, tiny_model_dir,
                                                                                 postgres_url, redis_url):
    stack = make_stack(tmp_path, postgres_url, redis_url, tiny_model_dir, PATCHBAY_KEY_REQUESTS_PER_MINUTE="5")
    stack.start_api()
    second_port = free_port()
    stack._start_server("api", second_port, 60)
    other_key = stack.cli("team", "create", "globex").splitlines()[-1]
    first, second = stack.base_url, f"http://127.0.0.1:{second_port}"
    try:
        headers = {"Authorization": f"Bearer {stack.key}"}
        statuses = [httpx.get(f"{url}/v1/files", headers=headers).status_code
                    for url in (first, second, first, second, first)]
        assert statuses == [200] * 5
        refused = httpx.get(f"{second}/v1/files", headers=headers)
        assert refused.status_code == 429, refused.text
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert refused.headers["x-ratelimit-limit-requests"] == "5"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["x-ratelimit-reset-requests"]
        for url in (first, second):  # another team is not limited by the first
            assert httpx.get(f"{url}/v1/files", headers={"Authorization": f"Bearer {other_key}"}).status_code == 200

        client = OpenAI(base_url=f"{first}/v1", api_key=stack.key, max_retries=3, timeout=30)
        started = time.monotonic()
        page = client.files.list()  # 429 first; the client waits out Retry-After and succeeds
        waited = time.monotonic() - started
        assert page.data == [] and 1 < waited < 75, waited
    finally:
        stack.stop()
