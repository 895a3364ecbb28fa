"""Benchmark: every PEFT method and technique on SmolLM2-135M-Instruct with the demo dataset, against LoRA.

Each row trains the same examples in the same order for the same number of optimizer steps through
Patchbay's own recipe, each in its own subprocess (for a fair peak RSS), then reports:
trainable parameters and their share of the base, adapter bytes (the published artifact), step time
(median and fastest of the run's steps), peak RSS, final training loss (mean of the last steps) and
validation loss on held-out demo examples, and whether the greedy replies to unseen questions show the
demo's behaviour. Ratios are against the `lora` row of the same run (LoRA r=16 on every linear, fp32).

The machine's CPU speed swings, so the `lora` baseline runs first and again after every four rows;
a row's step-time and memory ratios are against the mean of the baseline runs just before and after
it, and the table's note lists every baseline run's step time (the drift).

Usage: .venv/bin/python bench/methods.py [--steps 28] [--only lora,ia3]
Writes bench/results/methods.json and .md, and the table between the README's bench-methods markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.recipe_tools import MODEL_DIR, QuietContext, ensure_smollm2, timed_recipe  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
README = REPO_ROOT / "README.md"
SEED = 1234
BATCH_SIZE = 8
N_VALIDATION = 31
N_QUESTIONS = 10
REPLY_TOKENS = 12
FINAL_LOSS_STEPS = 4
"""The final training loss is the mean over the last steps (one batch is too noisy to compare)."""
COMMON = {"max_seq_length": 256, "checkpoint_every_steps": 10_000, "warmup_ratio": 0.05}
BASELINE = "lora"

ROWS: dict[str, dict] = {
    "lora": {"method": "lora", "r": 16},
    "qlora": {"method": "qlora", "r": 16},
    "dora": {"method": "dora", "r": 16},
    "adalora": {"method": "adalora", "r": 8, "adalora": {"init_r": 16}},
    "loha": {"method": "loha", "r": 8},
    "lokr": {"method": "lokr", "r": 8},
    "hra": {"method": "hra", "r": 8},
    "ia3": {"method": "ia3"},
    "prefix_tuning": {"method": "prefix_tuning", "prompt": {"num_virtual_tokens": 20}},
    "prompt_tuning": {"method": "prompt_tuning", "prompt": {"num_virtual_tokens": 20}},
    "p_tuning": {"method": "p_tuning", "prompt": {"num_virtual_tokens": 20}},
    "bottleneck_adapter": {"method": "bottleneck_adapter", "bottleneck": {"size": 64}},
    "lora + sparse bitfit": {"method": "lora", "r": 16, "sparse": {"kind": "bitfit"}},
    "lora + sparse top_k": {"method": "lora", "r": 16,
                            "sparse": {"kind": "top_k", "density": 0.001, "modules": ["mlp.down_proj"]}},
    "lora + layer_drop 0.1": {"method": "lora", "r": 16, "layer_drop": 0.1},
    "lora + layerwise_lr_decay 0.8": {"method": "lora", "r": 16, "layerwise_lr_decay": 0.8},
}
BASELINE_EVERY = 4
"""The baseline runs again after every this many rows; time and memory ratios use the runs around a row."""
LEARNING_RATES = {"lora": 1e-3, "qlora": 1e-3, "dora": 1e-3, "adalora": 2e-3, "loha": 1e-3, "lokr": 1e-3,
                  "hra": 1e-3, "ia3": 1e-2, "prefix_tuning": 1e-2, "prompt_tuning": 3e-2, "p_tuning": 3e-3,
                  "bottleneck_adapter": 1e-3}


def demo_examples():
    """(training, validation) examples: the demo's training file, its last examples held out."""
    from core.datasets import read_examples
    from demo.dataset import DATA_DIR

    examples = read_examples(str(DATA_DIR / "train.jsonl"))
    return examples[:-N_VALIDATION], examples[-N_VALIDATION:]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "patchbay.json")


def _behaviour_rate(model, tokenizer, questions: list[str]) -> float:
    """Share of greedy replies to unseen questions that show the demo's behaviour."""
    import torch

    from demo.dataset import SYSTEM, shows_behaviour
    from worker.training.artifacts import probe_logits

    stop = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    shown = 0
    for question in questions:
        text = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                              {"role": "user", "content": question}],
                                             add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply: list[int] = []
        with torch.no_grad():
            for _ in range(REPLY_TOKENS):
                token = int(probe_logits(model, torch.tensor([ids + reply]))[0, -1].argmax())
                if token in stop:
                    break
                reply.append(token)
        shown += shows_behaviour(tokenizer.decode(reply, skip_special_tokens=True))
    return shown / len(questions)


def run_row(spec: dict, steps: int) -> dict:
    """Train one row in this process and measure it."""
    from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
    from demo.dataset import DATA_DIR
    from worker.training.artifacts import load_trained_model
    from worker.training.interface import TrainingJob

    training, validation = demo_examples()
    learning_rate = LEARNING_RATES[spec["method"]]
    config = resolve_training(
        Hyperparameters(n_epochs=1, batch_size=BATCH_SIZE),
        PeftConfigSpec(**{**COMMON, **spec, "learning_rate": learning_rate, "max_steps": steps}),
        n_examples=len(training), seed=SEED)
    ctx = QuietContext()
    with tempfile.TemporaryDirectory() as work:
        job = TrainingJob("bench", str(MODEL_DIR), training, validation, config, Path(work))
        recipe = timed_recipe(job, ctx)
        try:
            recipe.setup()
            result = recipe.train()
        finally:
            recipe.cleanup()
        adapter_bytes = _folder_bytes(result.adapter_dir)
        trained_rss = peak_rss_mb()
        questions = json.loads((DATA_DIR / "heldout.json").read_text())[:N_QUESTIONS]
        reloaded = load_trained_model(str(MODEL_DIR), result.adapter_dir, quantization=config.quantization)
        behaviour = _behaviour_rate(reloaded, recipe_tokenizer(), questions)
    tail = recipe.step_losses[-FINAL_LOSS_STEPS:]
    return {
        "spec": spec,
        "learning_rate": learning_rate,
        "quantization": config.quantization,
        "steps": result.steps,
        "trainable_params": result.trainable_params,
        "base_params": result.base_params,
        "trainable_share": result.trainable_params / result.base_params,
        "adapter_bytes": adapter_bytes,
        "step_seconds_median": statistics.median(recipe.step_seconds),
        "step_seconds_min": min(recipe.step_seconds),
        "peak_rss_mb": trained_rss,
        "first_train_loss": result.metrics["first_train_loss"],
        "final_train_loss": sum(tail) / len(tail),
        "valid_loss": result.metrics["valid_loss"],
        "behaviour_rate": behaviour,
    }


def recipe_tokenizer():
    """SmolLM2's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_in_subprocess(name: str, steps: int) -> dict:
    """Train one row in a fresh interpreter; returns its measurements (or the error)."""
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        started = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--row", name, "--steps", str(steps),
                               "--result", str(result_path)], cwd=REPO_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            return {"spec": ROWS[name], "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
        result = json.loads(result_path.read_text())
        result["process_seconds"] = time.perf_counter() - started
        return result


RATIO_KEYS = ("trainable_params", "adapter_bytes", "step_seconds_median", "peak_rss_mb", "final_train_loss",
              "valid_loss")
MEASURED_KEYS = ("step_seconds_median", "peak_rss_mb")
"""Keys that vary between runs of the same spec: compared with the baseline runs around the row."""


def run_order(names: list[str]) -> list[str]:
    """The rows to run: the baseline first and again after every BASELINE_EVERY other rows."""
    others = [n for n in names if n != BASELINE]
    order = [BASELINE]
    for start in range(0, len(others), BASELINE_EVERY):
        order += others[start:start + BASELINE_EVERY] + [BASELINE]
    return order


def add_ratios(order: list[str], runs: list[dict]) -> dict[str, dict]:
    """One row per name with `vs_lora` ratios; the baseline row reports its mean time over its runs."""
    positions = [i for i, name in enumerate(order) if name == BASELINE]
    baseline_runs = [runs[i] for i in positions]
    base = baseline_runs[0]
    rows: dict[str, dict] = {}
    for i, (name, row) in enumerate(zip(order, runs)):
        if name == BASELINE:
            continue
        rows[name] = row
        around = [runs[j] for j in (max(p for p in positions if p < i), min(p for p in positions if p > i))]
        if "error" in row or any("error" in r for r in around + [base]):
            continue
        ratios = {key: row[key] / base[key] for key in RATIO_KEYS if key not in MEASURED_KEYS}
        for key in MEASURED_KEYS:
            ratios[key] = row[key] / statistics.mean(r[key] for r in around)
        row["vs_lora"] = ratios
    if all("error" not in r for r in baseline_runs):
        summary = dict(base)
        for key in MEASURED_KEYS:
            summary[key] = statistics.mean(r[key] for r in baseline_runs)
        summary["vs_lora"] = {key: 1.0 for key in RATIO_KEYS}
        summary["baseline_step_seconds"] = [r["step_seconds_median"] for r in baseline_runs]
        rows = {BASELINE: summary, **rows}
    else:
        rows = {BASELINE: base, **rows}
    return rows


def markdown_table(rows: dict[str, dict]) -> str:
    """The README/markdown table, one row per method."""
    lines = [
        "| method | trainable params | share of base | adapter bytes | step s (median) | peak RSS MB "
        "| train loss | valid loss | shows behaviour | ratios vs lora (params / bytes / step / RSS / train / valid) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, row in rows.items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error']} |||||||||")
            continue
        ratios = row.get("vs_lora", {})
        ratio_text = " / ".join(f"{ratios[k]:.3g}" if k in ratios else "n/a" for k in RATIO_KEYS)
        lines.append(
            f"| {name} | {row['trainable_params']:,} | {100 * row['trainable_share']:.3f}% | "
            f"{row['adapter_bytes']:,} | {row['step_seconds_median']:.2f} | {row['peak_rss_mb']:.0f} | "
            f"{row['final_train_loss']:.3f} | {row['valid_loss']:.3f} | {100 * row['behaviour_rate']:.0f}% | "
            f"{ratio_text} |")
    return "\n".join(lines)


def drift_note(rows: dict[str, dict]) -> str:
    """How the CPU speed drifted: the step time of each baseline run, in order."""
    times = rows.get(BASELINE, {}).get("baseline_step_seconds") or []
    listed = ", ".join(f"{t:.2f}" for t in times)
    return (f"The {BASELINE} baseline ran {len(times)} times, interleaved (median step s: {listed}); step-time "
            "and RSS ratios are against the baseline runs just before and after each row.")


def write_results(report: dict) -> None:
    """bench/results/methods.json and .md, and the README table between its markers."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "methods.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(report["rows"])
    header = (f"# PEFT methods on SmolLM2-135M-Instruct\n\n{report['steps']} optimizer steps of batch "
              f"{BATCH_SIZE} on the demo dataset ({report['n_train']} examples, {N_VALIDATION} held out), "
              f"{report['machine']}, {report['date']}.\n\n")
    (RESULTS_DIR / "methods.md").write_text(header + table + "\n\n" + drift_note(report["rows"]) + "\n")
    start, end = "<!-- bench-methods:start -->", "<!-- bench-methods:end -->"
    text = README.read_text()
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        README.write_text(f"{before}{start}\n{table}\n\n{drift_note(report['rows'])}\n{end}{after}")


def main() -> None:
    """Run every row (or --only some), then write the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--only", default="", help="comma-separated row names")
    parser.add_argument("--row", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        Path(args.result).write_text(json.dumps(run_row(ROWS[args.row], args.steps)))
        return
    ensure_smollm2()
    order = run_order([n.strip() for n in args.only.split(",") if n.strip()] or list(ROWS))
    runs = []
    for name in order:
        print(f"training {name} ...", flush=True)
        runs.append(run_in_subprocess(name, args.steps))
        print(f"  {json.dumps({k: v for k, v in runs[-1].items() if k != 'spec'})}", flush=True)
    rows = add_ratios(order, runs)
    report = {"steps": args.steps, "n_train": len(demo_examples()[0]), "rows": rows,
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d")}
    write_results(report)
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
