"""schemathesis fuzzes the live API with an admin key, on SQLite and on Postgres.

The checks (schemathesis.toml): no server error but the documented 503 of inference with no inference
server running, every status documented, every body as documented. PATCHBAY_FUZZ_SECONDS sets the
time per database (default 180).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.services import REPO_ROOT, embedded_urls, make_stack

pytestmark = pytest.mark.slow
FUZZ_SECONDS = os.environ.get("PATCHBAY_FUZZ_SECONDS", "180")
CHECKS = "not_a_server_error,status_code_conformance,response_schema_conformance"


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_fuzzing_finds_no_server_error_and_no_undocumented_answer(tmp_path, tiny_model_dir, request, backend):
    urls = (request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url")) \
        if backend == "postgres" else embedded_urls(tmp_path)
    stack = make_stack(tmp_path, *urls, tiny_model_dir, PATCHBAY_KEY_REQUESTS_PER_MINUTE="0",
                       PATCHBAY_FAILED_AUTH_PER_MINUTE="0", PATCHBAY_INFERENCE_URL="http://127.0.0.1:9")
    stack.key = stack.cli("team", "create", "fuzzers", "--admin").splitlines()[-1]
    stack.start_api()
    schemathesis = Path(sys.executable).with_name("schemathesis")
    try:
        done = subprocess.run(
            [str(schemathesis), "--config-file", str(REPO_ROOT / "schemathesis.toml"), "run",
             f"{stack.base_url}/openapi.json", "--checks", CHECKS, "--max-time", FUZZ_SECONDS, "--seed", "20261201",
             "-H", f"Authorization: Bearer {stack.key}", "--report", "junit", "--report-dir", str(tmp_path / "report")],
            cwd=tmp_path, capture_output=True, text=True, timeout=int(FUZZ_SECONDS) + 300)
        generated = re.search(r"(\d+) generated", done.stdout)
        print(f"schemathesis on {backend}: {generated.group(1) if generated else '?'} test cases")
        assert done.returncode == 0, done.stdout[-20000:] + done.stderr[-4000:] + stack.logs()
        assert generated and int(generated.group(1)) > 100, done.stdout[-4000:]
        assert " 500 " not in (stack.data_dir / f"api-{stack.port}.log").read_text()
    finally:
        stack.stop()
