"""A job's live event stream on a real server: the events as `data:` frames, pings while quiet, `[DONE]` at the end."""

from __future__ import annotations

import json

import httpx

from core import sse
from tests.support.datasets import chat_lines, to_jsonl
from tests.support.live_server import live_server


def test_a_quiet_stream_pings_until_the_job_ends(api, monkeypatch):
    monkeypatch.setattr(sse, "PING_SECONDS", 0.2)
    upload = api.client.post("/v1/files", headers=api.headers(), data={"purpose": "fine-tune"},
                             files={"file": ("train.jsonl", to_jsonl(chat_lines(40)))})
    job = api.client.post("/v1/fine_tuning/jobs", headers=api.headers(),
                          json={"model": "tiny-llama", "training_file": upload.json()["id"]}).json()
    lines = []
    with live_server(api.client.app) as url, httpx.Client(base_url=url, headers=api.headers(), timeout=20) as client:
        with client.stream("GET", f"/v1/fine_tuning/jobs/{job['id']}/events", params={"stream": "true"}) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            assert stream.headers["cache-control"] == "no-cache"
            for line in stream.iter_lines():
                lines.append(line)
                if lines.count(": ping") == 2:  # quiet while the job waits for a worker
                    assert client.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel").status_code == 200
        listed = client.get(f"/v1/fine_tuning/jobs/{job['id']}/events").json()["data"]
    data = [line for line in lines if line.startswith("data: ")]
    assert data[-1] == "data: [DONE]"
    assert [json.loads(line[6:]) for line in data[:-1]] == listed[::-1]  # the events, oldest first, as listed
    assert "Created fine-tuning job" in data[0] and "cancelled" in data[-2]
    assert lines.index(": ping") < lines.index(data[-2])  # pinged before the job ended
    assert set(lines) <= {*data, ": ping", ""}
