"""Serve one trained adapter with both engines and print their tokens/s side by side (part of gpu_check.sh).

It needs a running `patchbay serve` (our engine's replica of the default base) and the adapter's name.
It starts a vLLM replica of the same base, then sends each replica the same 16 concurrent greedy chat
requests of 64 tokens (base, then the adapter), directly with the header the API would add, three
interleaved repeats. The baseline is our engine; the ratio is vLLM / ours.

Usage: python bench/gpu_engines.py --adapter NAME --ours http://127.0.0.1:8001 [--repeats 3]
(with the same PATCHBAY_* environment as the running serve). Writes bench/results/gpu_engines.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from core.db import session_scope  # noqa: E402
from core.models import Adapter  # noqa: E402
from core.schemas.inference import AdapterRef  # noqa: E402

BASE = "smollm2-135m-instruct"
CONCURRENCY, NEW_TOKENS = 16, 64
QUESTIONS = ["What is the opposite of big?", "What is 8 plus 9?", "Name a colour.", "What day comes after Sunday?"]


def adapter_ref(name: str) -> AdapterRef:
    """The registry's reference of the newest ready version named `name` (or with that fine-tuned model)."""
    with session_scope() as session:
        rows = [a for a in session.query(Adapter).filter(Adapter.status == "ready")
                if name in (a.name, a.fine_tuned_model)]
        return AdapterRef.of(max(rows, key=lambda a: a.version))


async def tokens_per_second(url: str, model: str, ref: AdapterRef | None) -> float:
    headers = {"X-Patchbay-Adapter": ref.model_dump_json()} if ref else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=600) as client:
        async def one(i: int) -> int:
            answer = await client.post("/v1/chat/completions", json={
                "model": model, "max_tokens": NEW_TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]})
            answer.raise_for_status()
            return answer.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one(i) for i in range(CONCURRENCY))))
        return tokens / (time.perf_counter() - start)


def wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} was not ready in {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapter", required=True)
    parser.add_argument("--ours", default="http://127.0.0.1:8001")
    parser.add_argument("--vllm-port", type=int, default=8011)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ref = adapter_ref(args.adapter)
    vllm_url = f"http://127.0.0.1:{args.vllm_port}"
    replica = subprocess.Popen([sys.executable, "-m", "patchbay_cli", "inference", "--engine", "vllm",
                                "--base-model", BASE, "--port", str(args.vllm_port)], cwd=REPO_ROOT)
    try:
        wait_ready(vllm_url, 300)
        engines = {"ours": args.ours, "vllm": vllm_url}
        rows: dict[str, dict[str, list[float]]] = {e: {"base": [], "adapter": []} for e in engines}
        for url in engines.values():  # warm-up
            asyncio.run(tokens_per_second(url, args.adapter, ref))
        for repeat in range(args.repeats):
            for engine in (list(engines) if repeat % 2 == 0 else list(reversed(engines))):
                url = engines[engine]
                rows[engine]["base"].append(asyncio.run(tokens_per_second(url, BASE, None)))
                rows[engine]["adapter"].append(asyncio.run(tokens_per_second(url, args.adapter, ref)))
    finally:
        replica.terminate()
        replica.wait(60)
    medians = {e: {k: statistics.median(v) for k, v in kinds.items()} for e, kinds in rows.items()}
    print(f"\n{'tokens/s (median)':<22}{'ours':>10}{'vLLM':>10}{'vLLM/ours':>11}")
    for kind in ("base", "adapter"):
        ours, vllm = medians["ours"][kind], medians["vllm"][kind]
        print(f"{kind + f', {CONCURRENCY} concurrent':<22}{ours:>10.1f}{vllm:>10.1f}{vllm / ours:>10.2f}x")
    results = REPO_ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "gpu_engines.json").write_text(json.dumps({"rows": rows, "medians": medians}, indent=2) + "\n")


if __name__ == "__main__":
    main()
