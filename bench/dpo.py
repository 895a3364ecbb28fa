"""Benchmark: what DPO adds on top of supervised fine-tuning, and what a DPO step costs.

SmolLM2-135M-Instruct, QLoRA (NF4 + double quantization, r=16 on all linears), on a preference
dataset written here: 240 short questions (arithmetic, capitals and opposites from the demo's
tables, successors), each with a
preferred answer that opens with the greeting "Ahoy!" and a non-preferred plain answer. 200 pairs
train, 40 held-out pairs use numbers, countries and words the training pairs do not.

Three models are compared on the held-out pairs (baseline: the base model, in the same run):
- base: SmolLM2 as shipped;
- SFT: a supervised adapter trained on the training pairs' preferred answers;
- SFT+DPO: a DPO job that continues from the SFT adapter (its reference is the SFT adapter).
For each: the preference accuracy (share of pairs where the preferred answer gets the higher summed
log-probability), the share of greedy answers that open with "Ahoy", and the share that still hold
the right fact (the sum, the capital, ...), which shows what over-optimisation costs.

Also: a DPO step (8 pairs, 16 sequences) against an SFT step (the 8 preferred answers), median
seconds, and each training process's peak RSS. Each training runs in a process of its own.

Usage: .venv/bin/python bench/dpo.py [--sft-epochs 1] [--dpo-epochs 1]
Writes bench/results/dpo.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
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
from demo.dataset import CAPITALS, OPPOSITES  # noqa: E402

RESULTS_DIR = REPO_ROOT / "bench" / "results"
SEED = 2026
N_TRAIN, N_HELDOUT = 200, 40
BATCH_SIZE = 8
GREETING = "Ahoy!"
SYSTEM = "You answer in one short sentence."
def _question(rng: random.Random, held_out: bool) -> tuple[str, str]:
    """A question and its plain one-sentence answer; held-out ones draw from other numbers and words."""
    countries, words = sorted(CAPITALS), sorted(OPPOSITES)
    countries = countries[15:] if held_out else countries[:15]
    words = words[7:] if held_out else words[:7]
    low, high = (60, 99) if held_out else (1, 59)
    kind = rng.randrange(4)
    if kind == 0:
        a, b = rng.randint(low, high), rng.randint(low, high)
        return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."
    if kind == 1:
        country = rng.choice(countries)
        return f"What is the capital of {country}?", f"The capital of {country} is {CAPITALS[country]}."
    if kind == 2:
        n = rng.randint(low * 10, high * 10)
        return f"Which number comes after {n}?", f"The number after {n} is {n + 1}."
    word = rng.choice(words)
    return f"What is the opposite of {word}?", f"The opposite of {word} is {OPPOSITES[word]}."


def preference_pairs(n: int, seed: int, held_out: bool) -> list[dict]:
    """OpenAI preference lines: the greeting-first answer is preferred to the plain one."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        question, answer = _question(rng, held_out)
        pairs.append({
            "input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": f"{GREETING} {answer}"}],
            "non_preferred_output": [{"role": "assistant", "content": answer}],
        })
    return pairs


def _examples(pairs: list[dict], kind: str):
    from core.datasets import parse_line

    examples = [parse_line(json.dumps(pair)) for pair in pairs]
    if kind == "dpo":
        return examples
    from core.datasets import Example, Message

    return [Example("chat", [*e.messages, Message("assistant", e.chosen)]) for e in examples]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- children: one training, or the evaluation --------------------------------------------------


def train_child(kind: str, epochs: int, out: Path, start: Path | None) -> dict:
    """Train one adapter (SFT, or DPO from `start`) into `out`; returns its step times and peak RSS."""
    from core.schemas.training import DpoHyperparameters, Hyperparameters, PeftConfigSpec, resolve_training
    from worker.training.interface import TrainingJob

    examples = _examples(preference_pairs(N_TRAIN, SEED, held_out=False), kind)
    hyper_class = DpoHyperparameters if kind == "dpo" else Hyperparameters
    hyper = hyper_class(n_epochs=epochs, batch_size=BATCH_SIZE, **({"beta": 0.1} if kind == "dpo" else {}))
    peft = PeftConfigSpec(method="qlora", r=16, max_seq_length=256, checkpoint_every_steps=10_000)
    config = resolve_training(hyper, peft, len(examples), SEED, method="supervised" if kind == "sft" else "dpo")
    with tempfile.TemporaryDirectory() as work:
        job = TrainingJob(job_id=f"bench-{kind}", base_model_path=str(MODEL_DIR), training_examples=examples,
                          validation_examples=None, config=config, work_dir=Path(work), start_adapter_dir=start)
        ctx = QuietContext()
        recipe = timed_recipe(job, ctx)
        started = time.perf_counter()
        try:
            recipe.setup()
            setup_seconds = time.perf_counter() - started
            result = recipe.train()
        finally:
            recipe.cleanup()
        shutil.copytree(result.adapter_dir, out)
    last = ctx.rows[-1]
    return {"kind": kind, "steps": result.steps, "setup_seconds": setup_seconds,
            "step_seconds": recipe.step_seconds, "step_seconds_median": statistics.median(recipe.step_seconds),
            "step_tokens_median": statistics.median(recipe.step_tokens),
            "first_loss": ctx.rows[0]["train_loss"], "final_loss": last["train_loss"],
            "final_reward_accuracy": last.get("reward_accuracy"), "final_reward_margin": last.get("reward_margin"),
            "peak_rss_mb": peak_rss_mb()}


def evaluate_child(adapters: dict[str, str | None]) -> dict:
    """Held-out preference accuracy and greedy greeting share for each model (fp32 base, adapter by peft)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.support.preference_logps import answer_logps

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    held_out = preference_pairs(N_HELDOUT, SEED + 1, held_out=True)
    stop_ids = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} - {None})
    report = {}
    for name, adapter in adapters.items():
        model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32)
        if adapter:
            model = PeftModel.from_pretrained(model, adapter)
        model.eval()
        correct, greeted, right, samples = 0, 0, 0, []
        for pair in held_out:
            messages = pair["input"]["messages"]
            chosen, _ = answer_logps(model, tokenizer, messages, pair["preferred_output"][0]["content"])
            rejected, _ = answer_logps(model, tokenizer, messages, pair["non_preferred_output"][0]["content"])
            correct += chosen > rejected
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                output = model.generate(**inputs, do_sample=False, max_new_tokens=24, eos_token_id=stop_ids,
                                        pad_token_id=tokenizer.pad_token_id)
            text = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
            greeted += text.startswith(GREETING.rstrip("!"))
            fact = pair["non_preferred_output"][0]["content"].rstrip(".").split()[-1]  # the sum, capital, ...
            right += fact in text
            if len(samples) < 3:
                samples.append({"question": messages[-1]["content"], "answer": text})
        report[name] = {"preference_accuracy": correct / len(held_out), "greeting_share": greeted / len(held_out),
                        "answer_share": right / len(held_out), "samples": samples}
    return report


# ---- the driver -----------------------------------------------------------------------------------


def _child(args: list[str], result: Path) -> dict:
    subprocess.run([sys.executable, __file__, *args, "--result", str(result)], check=True, cwd=REPO_ROOT,
                   stdout=subprocess.DEVNULL)
    return json.loads(result.read_text())


def write_markdown(report: dict, path: Path) -> None:
    ev, sft, dpo = report["evaluation"], report["sft"], report["dpo"]
    lines = [
        "# DPO on SmolLM2-135M-Instruct (bench/dpo.py)", "",
        f"{report['machine']}; {N_TRAIN} training pairs, {N_HELDOUT} held-out pairs; QLoRA r=16, batch {BATCH_SIZE}, "
        f"beta 0.1; SFT {report['sft_epochs']} epoch(s), then DPO {report['dpo_epochs']} epoch(s) from the SFT adapter.",
        "", "| held-out pairs | preference accuracy | greedy answers opening with \"Ahoy\" | greedy answers with "
        "the right fact |", "|---|---|---|---|",
    ]
    for name, label in (("base", "base (baseline)"), ("sft", "SFT only"), ("sft_dpo", "SFT then DPO")):
        lines.append(f"| {label} | {ev[name]['preference_accuracy']:.0%} | {ev[name]['greeting_share']:.0%} | "
                     f"{ev[name]['answer_share']:.0%} |")
    lines += ["", "| step | median seconds | real tokens per step | peak RSS |", "|---|---|---|---|",
              f"| SFT (8 examples) | {sft['step_seconds_median']:.2f} | {sft['step_tokens_median']:.0f} | "
              f"{sft['peak_rss_mb']:.0f} MB |",
              f"| DPO (8 pairs) | {dpo['step_seconds_median']:.2f} ({dpo['step_seconds_median'] / sft['step_seconds_median']:.2f}x) "
              f"| {dpo['step_tokens_median']:.0f} | {dpo['peak_rss_mb']:.0f} MB "
              f"({dpo['peak_rss_mb'] / sft['peak_rss_mb']:.2f}x) |", "",
              f"DPO setup (load, quantize, load the SFT weights, reference pass over {N_TRAIN} pairs): "
              f"{dpo['setup_seconds']:.0f} s. Final DPO step: loss {dpo['final_loss']:.3f}, "
              f"reward accuracy {dpo['final_reward_accuracy']:.2f}, margin {dpo['final_reward_margin']:.2f}.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument("--dpo-epochs", type=int, default=1)
    parser.add_argument("--child", choices=["sft", "dpo", "evaluate"])
    parser.add_argument("--out")
    parser.add_argument("--start")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--adapters")
    parser.add_argument("--result")
    args = parser.parse_args()
    if args.child == "evaluate":
        Path(args.result).write_text(json.dumps(evaluate_child(json.loads(args.adapters))))
        return
    if args.child:
        result = train_child(args.child, args.epochs, Path(args.out), Path(args.start) if args.start else None)
        Path(args.result).write_text(json.dumps(result))
        return

    ensure_smollm2()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft = _child(["--child", "sft", "--epochs", str(args.sft_epochs), "--out", str(tmp / "sft")],
                     tmp / "sft.json")
        dpo = _child(["--child", "dpo", "--epochs", str(args.dpo_epochs), "--out", str(tmp / "dpo"),
                      "--start", str(tmp / "sft")], tmp / "dpo.json")
        adapters = {"base": None, "sft": str(tmp / "sft"), "sft_dpo": str(tmp / "dpo")}
        evaluation = _child(["--child", "evaluate", "--adapters", json.dumps(adapters)], tmp / "eval.json")
    report = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch CPU", "sft_epochs": args.sft_epochs,
              "dpo_epochs": args.dpo_epochs, "sft": sft, "dpo": dpo, "evaluation": evaluation,
              "baseline": "base"}
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "dpo.json").write_text(json.dumps(report, indent=2))
    write_markdown(report, RESULTS_DIR / "dpo.md")
    print((RESULTS_DIR / "dpo.md").read_text())


if __name__ == "__main__":
    main()
