"""Benchmark: Patchbay's training recipe against a plain transformers Trainer + peft QLoRA baseline.

Both train SmolLM2-135M-Instruct (NF4 + double quantization, LoRA r=16 on all linears, batch 8)
on the same synthetic chat examples, in the same order, with the same hyperparameters and the
same number of steps. Each training runs in its own subprocess (for a fair peak RSS), and the
two alternate over several repeats because this machine's CPU speed swings a lot.

Reported per method: real (non-padding) tokens/s (min / median over repeats), peak RSS, the
final training loss each reports, and a common held-out loss computed by the same code for
both: mean cross-entropy over assistant tokens including the end-of-turn token (and without it).

Each run uses the allocator its configuration names: the recipe tcmalloc, as `patchbay worker`
runs it (`worker.allocator`), and the baseline the system's malloc, as a user runs it. The
recipe on the system's malloc and the baseline on tcmalloc run too, so the allocator's share shows.

Usage: .venv/bin/python bench/train_throughput.py [--steps 6] [--repeats 3]
Writes bench/results/train_throughput.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
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
SEED = 1234
N_TRAIN = 400
N_HELDOUT = 16
BATCH_SIZE = 8
LORA_R = 16
LEARNING_RATE = 2e-4
WARMUP_RATIO = 0.03

WORDS = (
    "apple river stone cloud garden window silver market lantern forest engine paper "
    "harbor winter candle mirror valley thunder basket copper meadow rocket violin "
    "pepper island bridge feather castle orbit marble canyon helmet tulip compass"
).split()
SYSTEM_PROMPTS = [None, None, "Be brief.", "You are a careful assistant who follows instructions exactly."]


# ---- model and data --------------------------------------------------------------------------


def model_sha256() -> str:
    """sha256 of the converted weights, to name the model in the results."""
    from core.storage import sha256_file

    return sha256_file(MODEL_DIR / "model.safetensors")


def _task(rng: random.Random, n_words: int) -> tuple[str, str]:
    words = [rng.choice(WORDS) for _ in range(n_words)]
    kind = rng.choice(["repeat", "reverse", "upper", "count"])
    listing = " ".join(words)
    if kind == "repeat":
        return f"Repeat these words exactly: {listing}", listing
    if kind == "reverse":
        return f"Write these words in reverse order: {listing}", " ".join(reversed(words))
    if kind == "upper":
        return f"Write these words in capital letters: {listing}", listing.upper()
    counts = {w: words.count(w) for w in dict.fromkeys(words)}
    return f"Count how often each word appears: {listing}", "\n".join(f"{w}: {c}" for w, c in counts.items())


def synthetic_chats(n: int, seed: int):
    """Deterministic chat examples with learnable answers, about 25-290 tokens each."""
    from core.datasets import Example, Message

    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        n_words = rng.randint(1, 66)  # the answer's length follows the prompt's
        question, answer = _task(rng, n_words)
        messages = []
        system = rng.choice(SYSTEM_PROMPTS)
        if system:
            messages.append(Message("system", system))
        messages += [Message("user", question), Message("assistant", answer)]
        examples.append(Example("chat", messages))
    return examples


def heldout_losses(model, tokenizer, examples) -> dict:
    """Token-mean cross-entropy over assistant tokens, with and without their end-of-turn token."""
    import torch
    import torch.nn.functional as F

    from worker.training.data import IGNORE_INDEX, tokenize_example
    from worker.training.model import evaluation_mode

    eos = tokenizer.eos_token_id
    sums = {"with_eos": 0.0, "without_eos": 0.0}
    counts = {"with_eos": 0, "without_eos": 0}
    with evaluation_mode(model), torch.no_grad():
        for example in examples:
            tokenized = tokenize_example(example, tokenizer, max_seq_length=1024, train_on_inputs=False)
            ids = torch.tensor([tokenized.input_ids])
            targets = torch.tensor(tokenized.next_token_targets())
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
            losses = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
            labelled = targets != IGNORE_INDEX
            not_eos = labelled & (targets != eos)
            sums["with_eos"] += losses[labelled].sum().item()
            counts["with_eos"] += int(labelled.sum())
            sums["without_eos"] += losses[not_eos].sum().item()
            counts["without_eos"] += int(not_eos.sum())
    return {k: sums[k] / counts[k] for k in sums}


def ordered_training_examples():
    """The training examples in the recipe's epoch-0 order, so both methods see the same steps."""
    from worker.training.data import epoch_order

    examples = synthetic_chats(N_TRAIN, SEED)
    return [examples[i] for i in epoch_order(len(examples), SEED, 0)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- the two methods, each run in its own process ---------------------------------------------


VARIANTS = {
    # name: (loss computed in chunks of labelled tokens, activation checkpointing, allocator)
    "ours": (True, "auto", "tcmalloc"),
    "ours-unchunked": (False, "auto", "tcmalloc"),
    "ours-checkpointing": (True, True, "tcmalloc"),
    "ours-system-malloc": (True, "auto", "system"),
}
"""The recipe's configurations: the default (chunked loss, on tcmalloc as a worker runs it), the full-logits
loss, activation checkpointing, and the default on the system's malloc."""
BASELINES = {"baseline": "system", "baseline-tcmalloc": "tcmalloc"}
"""The Trainer baseline as a user runs it (the system's malloc), and on tcmalloc like our worker."""
DEFAULT_VARIANTS = ("ours", "ours-checkpointing", "ours-system-malloc", "baseline-tcmalloc")
VARIANT_LABELS = {"ours": "recipe (default: chunked loss, tcmalloc)",
                  "ours-unchunked": "recipe, all labelled tokens' logits at once",
                  "ours-checkpointing": "recipe + activation checkpointing",
                  "ours-system-malloc": "recipe on the system's malloc",
                  "baseline": "Trainer baseline", "baseline-tcmalloc": "Trainer baseline on tcmalloc"}


def run_ours(steps: int, heldout: list, evaluate_base: bool, variant: str = "ours") -> dict:
    from core.schemas.training import Hyperparameters, PeftConfigSpec, resolve_training
    from worker.training.chunked_loss import DEFAULT_CHUNK_TOKENS
    from worker.training.interface import TrainingJob

    chunked, checkpointing, _ = VARIANTS[variant]

    examples = synthetic_chats(N_TRAIN, SEED)  # the recipe shuffles them itself, with the same seed
    config = resolve_training(
        Hyperparameters(n_epochs=1, batch_size=BATCH_SIZE),
        PeftConfigSpec(
            method="qlora", r=LORA_R, learning_rate=LEARNING_RATE, warmup_ratio=WARMUP_RATIO,
            max_steps=steps, checkpoint_every_steps=10_000, packing=True, gradient_checkpointing=checkpointing,
        ),
        n_examples=len(examples),
        seed=SEED,
    )
    ctx = QuietContext()
    with tempfile.TemporaryDirectory() as work:
        job = TrainingJob("bench", str(MODEL_DIR), examples, None, config, Path(work))
        recipe = timed_recipe(job, ctx, loss_chunk_tokens=DEFAULT_CHUNK_TOKENS if chunked else None)
        recipe.setup()
        base_loss = heldout_losses(recipe.loaded.model, recipe.loaded.tokenizer, heldout) if evaluate_base else None
        started = time.perf_counter()
        result = recipe.train()
        seconds = time.perf_counter() - started
        final = heldout_losses(recipe.loaded.model, recipe.loaded.tokenizer, heldout)
        recipe.cleanup()
    return {
        "real_tokens": result.trained_tokens,
        "processed_tokens": result.trained_tokens,
        "train_seconds": seconds,
        "step_losses": [row["train_loss"] for row in ctx.rows],
        "step_seconds": recipe.step_seconds,
        "step_real_tokens": recipe.step_tokens,
        "final_train_loss": result.metrics["train_loss"],
        "heldout_before": base_loss,
        "heldout_after": final,
        "quantization": result.quantization,
    }


def run_baseline(steps: int, heldout: list, evaluate_base: bool) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    class StepTimer(TrainerCallback):
        """Times each optimizer step from on_step_begin to on_step_end."""

        def __init__(self):
            self.seconds: list[float] = []
            self._started = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.seconds.append(time.perf_counter() - self._started)

    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(
        MODEL_DIR,
        dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        device_map={"": "cpu"},
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(
        task_type="CAUSAL_LM", r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=0.05, target_modules="all-linear",
    ))
    base_loss = heldout_losses(model, tokenizer, heldout) if evaluate_base else None

    examples = ordered_training_examples()[: steps * BATCH_SIZE]
    texts = [
        tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in e.messages], tokenize=False)
        for e in examples
    ]
    encoded = [tokenizer(text)["input_ids"] for text in texts]
    dataset = [{"input_ids": ids} for ids in encoded]  # a list is a map-style dataset
    batches = [encoded[i : i + BATCH_SIZE] for i in range(0, len(encoded), BATCH_SIZE)]
    real_tokens = sum(len(ids) for ids in encoded)
    processed_tokens = sum(len(batch) * max(len(ids) for ids in batch) for batch in batches)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, per_device_train_batch_size=BATCH_SIZE, gradient_accumulation_steps=1,
            learning_rate=LEARNING_RATE, max_steps=steps, lr_scheduler_type="linear",
            warmup_steps=int(-(-WARMUP_RATIO * steps // 1)), weight_decay=0.0, max_grad_norm=1.0,
            optim="adamw_torch", logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            seed=SEED, train_sampling_strategy="sequential", dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
            data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        timer = StepTimer()
        trainer.add_callback(timer)
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    return {
        "real_tokens": real_tokens,
        "processed_tokens": processed_tokens,
        "train_seconds": seconds,
        "step_losses": losses,
        "step_seconds": timer.seconds,
        "step_real_tokens": [sum(len(ids) for ids in batch) for batch in batches],
        "final_train_loss": losses[-1] if losses else None,
        "heldout_before": base_loss,
        "heldout_after": heldout_losses(model, tokenizer, heldout),
    }


def worker_main(method: str, steps: int, result_path: Path, evaluate_base: bool) -> None:
    heldout = synthetic_chats(N_HELDOUT, SEED + 1)
    if method in BASELINES:
        result = run_baseline(steps, heldout, evaluate_base)
    else:
        result = run_ours(steps, heldout, evaluate_base, method)
    result["method"] = method
    result["tokens_per_second"] = result["real_tokens"] / result["train_seconds"]
    result["peak_rss_mb"] = peak_rss_mb()
    result_path.write_text(json.dumps(result))


# ---- the driver ------------------------------------------------------------------------------


def run_worker(method: str, steps: int, evaluate_base: bool) -> dict:
    """One training run in a process of its own, on the method's allocator."""
    from worker.allocator import allocator_environment

    allocator = BASELINES[method] if method in BASELINES else VARIANTS[method][2]
    env = allocator_environment(os.environ, allocator)
    with tempfile.TemporaryDirectory() as tmp:
        result_path = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", method, "--steps", str(steps), "--result", str(result_path)]
        if evaluate_base:
            command.append("--evaluate-base")
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, env=env)
        result = json.loads(result_path.read_text())
        result["process_seconds"] = time.perf_counter() - started
        return result


def best_step_tokens_per_second(runs: list[dict]) -> float:
    """Noise-robust speed: every step's fastest time over the repeats (the steps are identical)."""
    tokens = runs[0]["step_real_tokens"]
    fastest = [min(r["step_seconds"][k] for r in runs) for k in range(len(tokens))]
    return sum(tokens) / sum(fastest)


def summarize(runs: list[dict]) -> dict:
    speeds = [r["tokens_per_second"] for r in runs]
    last = runs[-1]
    return {
        "tokens_per_second_best_steps": best_step_tokens_per_second(runs),
        "tokens_per_second_best": max(speeds),  # the run with the least CPU throttling
        "tokens_per_second_median": statistics.median(speeds),
        "tokens_per_second_worst": min(speeds),
        "tokens_per_second_all": speeds,
        "peak_rss_mb_max": max(r["peak_rss_mb"] for r in runs),
        "peak_rss_mb_all": [r["peak_rss_mb"] for r in runs],
        "real_tokens": last["real_tokens"],
        "processed_tokens": last["processed_tokens"],
        "padding_fraction": 1 - last["real_tokens"] / last["processed_tokens"],
        "final_train_loss": statistics.median(r["final_train_loss"] for r in runs),
        "heldout_after_with_eos": statistics.median(r["heldout_after"]["with_eos"] for r in runs),
        "heldout_after_without_eos": statistics.median(r["heldout_after"]["without_eos"] for r in runs),
        "step_losses_first_run": runs[0]["step_losses"],
    }


def dataset_stats() -> dict:
    from transformers import AutoTokenizer

    from worker.training.data import tokenize_example

    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    lengths = []
    labelled = 0
    for example in synthetic_chats(N_TRAIN, SEED):
        tokenized = tokenize_example(example, tokenizer, max_seq_length=1024, train_on_inputs=False)
        lengths.append(tokenized.n_tokens)
        labelled += tokenized.n_labelled
    return {
        "examples": len(lengths),
        "tokens_min": min(lengths),
        "tokens_median": statistics.median(lengths),
        "tokens_max": max(lengths),
        "labelled_fraction": labelled / sum(lengths),
    }


def variant_table(report: dict) -> list[str]:
    """The recipe's variants against the baseline: speed, peak memory and held-out loss (markdown lines)."""
    base = report["baseline"]
    variants = {"ours": report["ours"], **report.get("variants", {})}
    lines = ["| Configuration | Real tokens/s (median) | vs baseline | Peak RSS | vs baseline | Held-out loss |",
             "|---|---|---|---|---|---|"]
    for name, summary in [*variants.items(), ("baseline", base)]:
        lines.append(
            f"| {VARIANT_LABELS[name]} | {summary['tokens_per_second_median']:.1f} | "
            f"{summary['tokens_per_second_median'] / base['tokens_per_second_median']:.2f}x | "
            f"{summary['peak_rss_mb_max'] / 1024:.2f} GB | {summary['peak_rss_mb_max'] / base['peak_rss_mb_max']:.2f}x | "
            f"{summary['heldout_after_with_eos']:.4f} |")
    return [*lines, ""]


def write_markdown(report: dict, path: Path) -> None:
    ours, base = report["ours"], report["baseline"]
    rows = [
        ("Real tokens/s, best / median / worst run",
         f"{ours['tokens_per_second_best']:.1f} / {ours['tokens_per_second_median']:.1f} / {ours['tokens_per_second_worst']:.1f}",
         f"{base['tokens_per_second_best']:.1f} / {base['tokens_per_second_median']:.1f} / {base['tokens_per_second_worst']:.1f}"),
        ("Real tokens/s, each step's fastest repeat", f"{ours['tokens_per_second_best_steps']:.1f}",
         f"{base['tokens_per_second_best_steps']:.1f}"),
        ("Padding", f"{ours['padding_fraction']:.0%}", f"{base['padding_fraction']:.0%}"),
        ("Peak RSS (max over repeats)", f"{ours['peak_rss_mb_max'] / 1024:.2f} GB", f"{base['peak_rss_mb_max'] / 1024:.2f} GB"),
        ("Own final train loss (median)", f"{ours['final_train_loss']:.3f}", f"{base['final_train_loss']:.3f}"),
        ("Held-out loss, assistant + end-of-turn", f"{ours['heldout_after_with_eos']:.3f}", f"{base['heldout_after_with_eos']:.3f}"),
        ("Held-out loss, assistant without end-of-turn", f"{ours['heldout_after_without_eos']:.3f}", f"{base['heldout_after_without_eos']:.3f}"),
    ]
    data = report["dataset"]
    lines = [
        "# Training throughput: Patchbay recipe vs Trainer + peft QLoRA",
        "",
        f"SmolLM2-135M-Instruct (sha256 `{report['model_sha256'][:16]}…`), NF4 + double quantization, fp32 compute, "
        f"LoRA r={LORA_R} (alpha {2 * LORA_R}, dropout 0.05) on all linears, batch {BATCH_SIZE}, lr {LEARNING_RATE}, "
        f"linear schedule with {WARMUP_RATIO:.0%} warmup, grad clip 1.0, activation checkpointing `auto` (off here: the activations fit) unless the row says otherwise, "
        f"{report['steps']} steps, {report['repeats']} interleaved repeats, each run in its own process.",
        f"Data: {data['examples']} synthetic chats, {data['tokens_min']}–{data['tokens_max']} tokens "
        f"(median {data['tokens_median']}), {data['labelled_fraction']:.0%} of tokens are assistant tokens; "
        "both methods see the same examples in the same order.",
        "",
        "| | Patchbay recipe | Trainer baseline |",
        "|---|---|---|",
        *[f"| {name} | {a} | {b} |" for name, a, b in rows],
        "",
        f"**Speed-up in real tokens/s: {report['speedup_median']:.2f}x (median runs), "
        f"{report['speedup_best']:.2f}x (best runs), {report['speedup_best_steps']:.2f}x (each step's fastest repeat).**",
        "The CPU's speed swings by up to 10x (and other processes may share it), so the best-run and "
        "fastest-step figures, which drop throttled periods, are the most comparable; the worst run is shown "
        "only to expose throttling.",
        "",
        *variant_table(report),
        f"Held-out loss before training: {report['heldout_before']['with_eos']:.3f} with the end-of-turn token, "
        f"{report['heldout_before']['without_eos']:.3f} without.",
        "The baseline trains on every non-padding token (prompt included) except `<|im_end|>`, which its collator "
        "masks because it is also the pad token; the recipe trains on assistant tokens and their `<|im_end|>`. "
        "Their own train losses therefore cover different tokens; the held-out losses are computed the same way for both.",
        "",
        f"Per-repeat real tokens/s — recipe: {', '.join(f'{x:.1f}' for x in ours['tokens_per_second_all'])}; "
        f"baseline: {', '.join(f'{x:.1f}' for x in base['tokens_per_second_all'])}.",
        f"Machine: {report['machine']}.",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=[*VARIANTS, *BASELINES])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"variants to run besides 'baseline', comma-separated, of {', '.join([*VARIANTS, *BASELINES])}")
    parser.add_argument("--result", type=Path)
    parser.add_argument("--evaluate-base", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker_main(args.worker, args.steps, args.result, args.evaluate_base)
        return

    ensure_smollm2()
    started = time.perf_counter()
    methods = [*args.variants.split(","), "baseline"]
    runs: dict[str, list[dict]] = {method: [] for method in methods}
    for repeat in range(args.repeats):
        order = methods if repeat % 2 == 0 else methods[::-1]
        for method in order:
            result = run_worker(method, args.steps, evaluate_base=repeat == 0 and method == "ours")
            runs[method].append(result)
            print(f"repeat {repeat + 1}/{args.repeats} {method:18s}: {result['tokens_per_second']:.1f} real tokens/s, "
                  f"peak RSS {result['peak_rss_mb'] / 1024:.2f} GB, final train loss {result['final_train_loss']:.3f}, "
                  f"held-out {result['heldout_after']['with_eos']:.3f}", flush=True)
    ours, base = summarize(runs["ours"]), summarize(runs["baseline"])
    cpu_flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    report = {
        "steps": args.steps,
        "repeats": args.repeats,
        "model_sha256": model_sha256(),
        "dataset": dataset_stats(),
        "ours": ours,
        "baseline": base,
        "variants": {method: summarize(runs[method]) for method in methods if method not in ("ours", "baseline")},
        "allocators": {method: BASELINES.get(method) or VARIANTS[method][2] for method in methods},
        "speedup_median": ours["tokens_per_second_median"] / base["tokens_per_second_median"],
        "speedup_best": ours["tokens_per_second_best"] / base["tokens_per_second_best"],
        "speedup_best_steps": ours["tokens_per_second_best_steps"] / base["tokens_per_second_best_steps"],
        "heldout_before": runs["ours"][0]["heldout_before"],
        "quantization": runs["ours"][0]["quantization"],
        "bench_seconds": time.perf_counter() - started,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"avx512_bf16={'avx512_bf16' in cpu_flags}, python {platform.python_version()}",
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "train_throughput.json").write_text(json.dumps(report, indent=1))
    write_markdown(report, RESULTS_DIR / "train_throughput.md")
    print(f"speed-up {report['speedup_median']:.2f}x (median), {report['speedup_best']:.2f}x (best), "
          f"{report['speedup_best_steps']:.2f}x (fastest repeat of each step); "
          f"wrote {RESULTS_DIR / 'train_throughput.md'}")


if __name__ == "__main__":
    main()
