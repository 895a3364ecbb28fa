"""Benchmark: API throughput and latency under concurrent clients, on the embedded SQLite default and on Postgres.

For each backend a real `patchbay api` process is started on a fresh store (sqlite: PATCHBAY_DATABASE_URL unset, so
SQLite and the SQLite broker under a temporary data dir; postgres: a database created and dropped by this bench, with
the Redis broker on redis://127.0.0.1:6379/15, or the SQLite broker with `--postgres-broker sqlite`), migrated, given
5 teams, a fake "tiny" base model and one prompt/completion file per team. Then `--clients` httpx clients (spread over
the teams' keys) hammer one operation of one backend at a time for `--seconds` (all APIs stay up throughout):

  healthz  GET /healthz, no key and no database: the named baseline
  submit   POST /v1/fine_tuning/jobs (lora, max_steps 1; no worker runs, so jobs only queue)
  list     GET /v1/files?limit=20

Operations and backends alternate in `--rounds` rounds (the order reversed on odd rounds) so that the CPU's drift hits
them all alike. Reported per backend and operation: requests/s (every answered request) and 2xx/s, p50 and p99 latency
of every answered request, non-2xx answers by status, transport errors by type, and req/s as a ratio of the same
backend's healthz req/s in this run. The load generator and the API share this machine's CPUs, and rate limits are
off (PATCHBAY_KEY_REQUESTS_PER_MINUTE=0, PATCHBAY_FAILED_AUTH_PER_MINUTE=0); the dispatcher runs inside the API.

Usage: .venv/bin/python bench/api_load.py [--seconds 20] [--clients 50] [--rounds 2] [--backends sqlite,postgres]
Writes bench/results/api_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.services import POSTGRES_ADMIN_URL, PatchbayStack, fresh_database  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
REDIS_URL = "redis://127.0.0.1:6379/15"
OPERATIONS = ("healthz", "submit", "list")
BASELINE = "healthz"
MODEL_ID = "tiny"
N_EXAMPLES = 8
MAX_EXAMPLES = 3
LOG_NOISE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ |\s*\(request req_\w+\)")
SERVER_ENV = {
    "PATCHBAY_KEY_REQUESTS_PER_MINUTE": "0",
    "PATCHBAY_FAILED_AUTH_PER_MINUTE": "0",
    "PATCHBAY_TEAM_MAX_QUEUED_JOBS": "0",
    "PATCHBAY_RUN_DISPATCHER": "true",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


# ---- fixtures -----------------------------------------------------------------------------------------------------


def write_fake_model(folder: Path) -> Path:
    """A base-model folder registration accepts: config.json, one tiny safetensors file, a chat-template tokenizer."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1, "vocab_size": 4}
    (folder / "config.json").write_text(json.dumps(config))
    data = struct.pack("<4f", 0.0, 0.5, -0.5, 1.0)
    tensor = {"dtype": "F32", "shape": [4, 1], "data_offsets": [0, len(data)]}
    header = json.dumps({"__metadata__": {"format": "pt"}, "model.embed_tokens.weight": tensor})
    header_bytes = header.encode().ljust(-(-len(header) // 8) * 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": "</s>"}))
    return folder


def dataset_bytes(team: str) -> bytes:
    """A small prompt/completion JSONL file."""
    rows = [{"prompt": f"{team}: what is {i} plus {i}?", "completion": f" {2 * i}."} for i in range(N_EXAMPLES)]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


# ---- stores and processes -----------------------------------------------------------------------------------------


@contextmanager
def redis_database(url: str):
    """A Redis database that must be empty at the start; flushed afterwards."""
    import redis

    client = redis.Redis.from_url(url)
    if client.dbsize():
        raise SystemExit(f"{url} is not empty; pass --redis-url with an unused database number")
    try:
        yield url
    finally:
        client.flushdb()
        client.close()


@dataclass
class Stack(PatchbayStack):
    """One backend: the test suite's process stack, plus its name and the teams' keys and files."""

    name: str = ""
    keys: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def problem_lines(self, most: int = 20) -> dict[str, int]:
        """The API log's warning and error lines, without timestamps and request ids, with their counts."""
        lines = [line for path in self.data_dir.glob("api-*.log") for line in path.read_text(errors="replace")
                 .splitlines()]
        marks = ("WARNING", "ERROR", "CRITICAL", "Error:")
        counts = Counter(LOG_NOISE.sub("", line).strip() for line in lines if any(m in line for m in marks))
        return dict(counts.most_common(most))


def make_stack(name: str, root: Path, database_url: str | None, broker_url: str | None, model_dir: Path,
               teams: int, cleanup: ExitStack) -> Stack:
    """Migrate a fresh store, create the teams, register the model, start the API and upload one file per team."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    data_dir = root / name
    data_dir.mkdir(parents=True)
    env.update(SERVER_ENV, PATCHBAY_DATA_DIR=str(data_dir))
    if database_url:
        env["PATCHBAY_DATABASE_URL"] = database_url
    if broker_url:
        env["PATCHBAY_BROKER_URL"] = broker_url
    stack = Stack(env=env, data_dir=data_dir, name=name)
    stack.cli("migrate")
    stack.keys = [stack.cli("team", "create", f"bench-{i}").splitlines()[-1] for i in range(teams)]
    stack.cli("models", "add", MODEL_ID, str(model_dir))
    cleanup.callback(stack.stop)
    stack.start_api()
    stack.files = [upload_file(stack.base_url, key, f"bench-{i}") for i, key in enumerate(stack.keys)]
    return stack


def upload_file(base_url: str, key: str, team: str) -> str:
    """Upload the team's dataset and return its file id (it must validate)."""
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60,
                      trust_env=False) as client:
        response = client.post("/v1/files", data={"purpose": "fine-tune"},
                               files={"file": ("train.jsonl", dataset_bytes(team), "application/jsonl")})
    response.raise_for_status()
    body = response.json()
    if body["status"] != "processed":
        raise RuntimeError(f"upload for {team} is {body['status']}: {body.get('status_details')}")
    return body["id"]


# ---- load ---------------------------------------------------------------------------------------------------------


def build_request(client: httpx.AsyncClient, operation: str, key: str, file_id: str) -> httpx.Request:
    """The request one client sends for an operation."""
    if operation == "healthz":
        return client.build_request("GET", "/healthz")
    headers = {"Authorization": f"Bearer {key}"}
    if operation == "submit":
        body = {"model": MODEL_ID, "training_file": file_id, "peft": {"method": "lora", "max_steps": 1}}
        return client.build_request("POST", "/v1/fine_tuning/jobs", json=body, headers=headers)
    return client.build_request("GET", "/v1/files", params={"limit": 20}, headers=headers)


async def client_loop(client: httpx.AsyncClient, operation: str, key: str, file_id: str, deadline: float,
                      samples: list[tuple[float, int | str]], examples: dict[str, list[str]]) -> None:
    """Send requests back to back until the deadline, recording (latency, status or error type).

    The first few distinct bodies of non-2xx answers (and messages of transport errors) go to `examples`.
    """
    while time.perf_counter() < deadline:
        request = build_request(client, operation, key, file_id)
        started = time.perf_counter()
        try:
            response = await client.send(request)
            await response.aread()
            outcome: int | str = response.status_code
            detail = response.text if not response.is_success else None
        except httpx.HTTPError as exc:
            outcome, detail = type(exc).__name__, str(exc) or repr(exc)
        samples.append((time.perf_counter() - started, outcome))
        if detail is not None:
            seen = examples.setdefault(str(outcome), [])
            if len(seen) < MAX_EXAMPLES and detail[:500] not in seen:
                seen.append(detail[:500])


async def measure(stack: Stack, operation: str, clients: int, seconds: float) -> dict:
    """Run one operation with `clients` concurrent clients for `seconds`; raw samples and elapsed time."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    samples: list[tuple[float, int | str]] = []
    examples: dict[str, list[str]] = {}
    async with httpx.AsyncClient(base_url=stack.base_url, limits=limits, timeout=60, trust_env=False) as client:
        await asyncio.gather(*(client.get("/healthz") for _ in range(clients)))
        started = time.perf_counter()
        deadline = started + seconds
        teams = [(stack.keys[i % len(stack.keys)], stack.files[i % len(stack.keys)]) for i in range(clients)]
        await asyncio.gather(*(client_loop(client, operation, key, file_id, deadline, samples, examples)
                               for key, file_id in teams))
        elapsed = time.perf_counter() - started
    return {"samples": samples, "elapsed_s": elapsed, "examples": examples}


# ---- statistics ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of sorted values (None when empty)."""
    if not values:
        return None
    return values[max(0, math.ceil(q / 100 * len(values)) - 1)]


def summarize(runs: list[dict]) -> dict:
    """Pool one operation's rounds: rates, latency percentiles and errors."""
    samples = [s for run in runs for s in run["samples"]]
    elapsed = sum(run["elapsed_s"] for run in runs)
    answered = sorted(latency for latency, outcome in samples if isinstance(outcome, int))
    statuses = Counter(outcome for _, outcome in samples if isinstance(outcome, int))
    ok = sum(n for status, n in statuses.items() if 200 <= status < 300)
    transport = Counter(outcome for _, outcome in samples if isinstance(outcome, str))
    p50, p99 = percentile(answered, 50), percentile(answered, 99)
    return {
        "requests": len(answered),
        "seconds": elapsed,
        "requests_per_s": len(answered) / elapsed,
        "ok_per_s": ok / elapsed,
        "p50_ms": p50 * 1000 if p50 is not None else None,
        "p99_ms": p99 * 1000 if p99 is not None else None,
        "non_2xx": len(answered) - ok,
        "non_2xx_by_status": {str(k): v for k, v in sorted(statuses.items()) if not 200 <= k < 300},
        "transport_errors": sum(transport.values()),
        "transport_errors_by_type": dict(transport),
        "error_examples": merge_examples(runs),
        "requests_per_s_by_round": [sum(isinstance(o, int) for _, o in r["samples"]) / r["elapsed_s"] for r in runs],
    }


def merge_examples(runs: list[dict]) -> dict[str, list[str]]:
    """The rounds' distinct error bodies per status or error type."""
    merged: dict[str, list[str]] = {}
    for run in runs:
        for outcome, bodies in run["examples"].items():
            seen = merged.setdefault(outcome, [])
            seen.extend(b for b in bodies if b not in seen and len(seen) < MAX_EXAMPLES)
    return merged


def with_ratios(results: dict[str, dict]) -> dict[str, dict]:
    """Add each operation's req/s as a ratio of the backend's healthz req/s."""
    baseline = results[BASELINE]["requests_per_s"]
    for summary in results.values():
        summary[f"ratio_to_{BASELINE}"] = summary["requests_per_s"] / baseline if baseline else None
    return results


def print_table(report: dict) -> None:
    """A readable table of every backend and operation."""
    header = (f"{'backend':9s} {'operation':9s} {'req/s':>8s} {'2xx/s':>8s} {'vs healthz':>10s} {'p50 ms':>8s} "
              f"{'p99 ms':>8s} {'non-2xx':>8s} {'transport':>9s}  error breakdown")
    print(header)
    print("-" * len(header))
    for backend, results in report["results"].items():
        for operation, s in results.items():
            breakdown = ", ".join(f"{k}: {v}" for k, v in {**s["non_2xx_by_status"],
                                                           **s["transport_errors_by_type"]}.items()) or "-"
            print(f"{backend:9s} {operation:9s} {s['requests_per_s']:8.1f} {s['ok_per_s']:8.1f} "
                  f"{_ratio(s['ratio_to_healthz'])} {_ms(s['p50_ms'])} {_ms(s['p99_ms'])} {s['non_2xx']:8d} "
                  f"{s['transport_errors']:9d}  {breakdown}")


def _ratio(value: float | None) -> str:
    return f"{value:9.3f}x" if value is not None else f"{'-':>10s}"


def _ms(value: float | None) -> str:
    return f"{value:8.1f}" if value is not None else f"{'-':>8s}"


# ---- main ---------------------------------------------------------------------------------------------------------


def machine_info() -> dict:
    """CPU, Python, OS, date and the commit this ran on."""
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True,
                                text=True).stdout.strip())
    return {"cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "platform": platform.platform(), "httpx": httpx.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": commit,
            "git_dirty": dirty}


def open_stacks(names: list[str], args: argparse.Namespace, cleanup: ExitStack) -> dict[str, Stack]:
    """Bring up every requested backend; everything started is registered with `cleanup`."""
    root = Path(tempfile.mkdtemp(prefix="patchbay-api-load-"))
    cleanup.callback(shutil.rmtree, root, ignore_errors=True)
    model_dir = write_fake_model(root / "tiny-model")
    stacks = {}
    for name in names:
        database_url = broker_url = None
        if name == "postgres":
            database_url = cleanup.enter_context(fresh_database())
            if args.postgres_broker == "redis":
                broker_url = cleanup.enter_context(redis_database(args.redis_url))
        stack = stacks[name] = make_stack(name, root, database_url, broker_url, model_dir, args.teams, cleanup)
        print(f"{name}: api on {stack.base_url}, {len(stack.keys)} teams, files {', '.join(stack.files)}", flush=True)
    return stacks


def run_rounds(stacks: dict[str, Stack], args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Every backend and operation once per round, the order reversed on odd rounds."""
    runs: dict[str, dict[str, list[dict]]] = {name: {op: [] for op in OPERATIONS} for name in stacks}
    plan = [(name, op) for name in stacks for op in OPERATIONS]
    for round_no in range(args.rounds):
        for name, op in (reversed(plan) if round_no % 2 else plan):
            run = asyncio.run(measure(stacks[name], op, args.clients, args.seconds))
            runs[name][op].append(run)
            answered = sum(isinstance(o, int) for _, o in run["samples"])
            print(f"round {round_no + 1}/{args.rounds} {name:8s} {op:8s} {answered / run['elapsed_s']:8.1f} req/s",
                  flush=True)
    return runs


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20, help="duration of each operation's run per round")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--teams", type=int, default=5)
    parser.add_argument("--backends", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    parser.add_argument("--postgres-broker", choices=["redis", "sqlite"], default="redis")
    parser.add_argument("--redis-url", default=REDIS_URL, help="an empty Redis database, flushed afterwards")
    args = parser.parse_args()
    args.backend_names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = set(args.backend_names) - {"sqlite", "postgres"}
    if unknown or not args.backend_names:
        parser.error(f"unknown backends: {', '.join(sorted(unknown)) or '(none given)'}")
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    with ExitStack() as cleanup:
        stacks = open_stacks(args.backend_names, args, cleanup)
        runs = run_rounds(stacks, args)
        logs = {name: stack.problem_lines() for name, stack in stacks.items()}
    brokers = {"sqlite": "sqla+sqlite (default, under the data dir)",
               "postgres": args.redis_url if args.postgres_broker == "redis" else "sqla+sqlite (default)"}
    report = {
        "baseline": BASELINE,
        "settings": {"seconds": args.seconds, "clients": args.clients, "rounds": args.rounds, "teams": args.teams,
                     "backends": args.backend_names, "operations": list(OPERATIONS),
                     "brokers": {b: brokers[b] for b in args.backend_names}, "server_env": SERVER_ENV,
                     "postgres": POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + "/<fresh database>",
                     "list_query": "limit=20", "files_per_team": 1, "examples_per_file": N_EXAMPLES,
                     "job": {"model": MODEL_ID, "peft": {"method": "lora", "max_steps": 1}}},
        "machine": machine_info(),
        "results": {name: with_ratios({op: summarize(r) for op, r in ops.items()}) for name, ops in runs.items()},
        "api_log_problems": logs,
        "bench_seconds": time.perf_counter() - started,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "api_load.json").write_text(json.dumps(report, indent=1) + "\n")
    print()
    print_table(report)
    print(f"\nwrote {RESULTS_DIR / 'api_load.json'}")


if __name__ == "__main__":
    main()
