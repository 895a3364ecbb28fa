"""Fixtures for the inference engine tests: adapters saved by plain peft, prompts, and peft references."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support.adapters import save_peft_lora

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# name -> (rank, target modules, seed, factor applied to lora_B so the adapter changes greedy outputs)
ADAPTER_SPECS = {
    "A": (8, "all-linear", 1, 2.0),
    "B": (16, ["gate_proj", "up_proj", "down_proj", "o_proj"], 1, 1.0),
    "C": (8, ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"], 3, 3.0),
    "D": (8, "all-linear", 4, 2.0),
}
MAX_LORA_RANK = 16
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "hi",
    "Explain continuous batching in one long sentence, with as many details as you can think of.",
]


@pytest.fixture(scope="session")
def lora_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Good adapters A (r=8, all linears), B (r=16, MLP + o_proj), C and D."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: save_peft_lora(tiny_model_dir, root / name, r=r, targets=targets, seed=seed, scale=factor)
        for name, (r, targets, seed, factor) in ADAPTER_SPECS.items()
    }


@pytest.fixture(scope="session")
def bad_lora_dirs(tiny_model_dir: Path, lora_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    """Adapters that must be refused, by kind."""
    import torch
    from safetensors.torch import load_file, save_file

    root = tmp_path_factory.mktemp("bad-adapters")
    source = lora_dirs["A"]
    tensors = load_file(source / "adapter_model.safetensors")
    q_a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def variant(name: str, new_tensors: dict) -> Path:
        dest = root / name
        dest.mkdir()
        shutil.copy(source / "adapter_config.json", dest / "adapter_config.json")
        save_file(new_tensors, dest / "adapter_model.safetensors")
        return dest

    wrong_shapes = variant("wrong-shapes", {**tensors, q_a: torch.zeros(8, 65)})
    renamed = {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v for k, v in tensors.items()}
    unknown_module = variant("unknown-module", renamed)
    bin_only = root / "bin-only"
    bin_only.mkdir()
    shutil.copy(source / "adapter_config.json", bin_only / "adapter_config.json")
    torch.save(tensors, bin_only / "adapter_model.bin")
    too_big = save_peft_lora(tiny_model_dir, root / "rank-32", r=32, targets=["q_proj"], seed=5)
    dora = save_peft_lora(tiny_model_dir, root / "dora", r=8, targets=["q_proj", "v_proj"], seed=6, use_dora=True)
    dora_tensors = load_file(dora / "adapter_model.safetensors")
    save_file({k: v for k, v in dora_tensors.items() if "magnitude" not in k}, dora / "adapter_model.safetensors")
    vera = root / "vera"
    vera.mkdir()
    (vera / "adapter_config.json").write_text(json.dumps({"peft_type": "VERA"}))
    return {
        "wrong-shapes": (wrong_shapes, "do not fit"),
        "unknown-module": (unknown_module, "unknown target module"),
        "rank-over-max": (too_big, "above the server's max LoRA rank"),
        "bin-only": (bin_only, "pickle files are refused"),
        "dora": (dora, "lacks lora_magnitude"),
        "unknown-type": (vera, "peft_type 'VERA' is not supported"),
    }


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir: Path):
    """SmolLM2's tokenizer, as saved with the tiny model."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def prompts(tokenizer) -> list[list[int]]:
    """Chat-templated prompts of different lengths, as token ids."""
    out = []
    for text in CHATS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        out.append(list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids))
    return out


def load_peft_reference(model_dir: Path, lora_dirs: dict[str, Path], quantization: str, names=("A", "B", "C", "D")):
    """Plain peft over the base (fp32 or 4-bit NF4 + DQ), with the named adapters loaded."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantization == "nf4-dq":
        kwargs = {
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
            ),
            "device_map": {"": "cpu"},
        }
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs)
    base.eval()
    model = PeftModel.from_pretrained(base, lora_dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(lora_dirs[name], adapter_name=name)
    model.eval()
    return model


def peft_greedy(model, adapter: str | None, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy tokens from plain peft `generate`, cut before the first end-of-sequence token."""
    import torch

    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        if adapter is None:
            with model.disable_adapter():
                out = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False)
        else:
            model.set_adapter(adapter)
            out = model.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    tokens = out[0, len(prompt) :].tolist()
    for i, token in enumerate(tokens):
        if token in eos_ids:
            return tokens[:i]
    return tokens


@pytest.fixture(scope="module")
def fp32_engine(tiny_model_dir: Path, lora_dirs: dict[str, Path]):
    """An fp32 engine (4 slots, max rank 16) with adapters A, B and C ready."""
    from worker.inference.engine import InferenceEngine

    with InferenceEngine(
        tiny_model_dir, quantization="none", max_loaded_adapters=4, max_lora_rank=MAX_LORA_RANK, max_batch_size=8
    ) as engine:
        for name in ("A", "B", "C"):
            engine.adapters.ensure(name, lambda name=name: lora_dirs[name])
        yield engine


def check_against_references(engine, references: dict, jobs: list, new_tokens: int) -> list[list[int]]:
    """For (adapter, prompt) jobs: the engine's greedy tokens alone and all batched together equal the reference
    model's `generate` (references[adapter]; None: the base), and its sampled log-probabilities in the mixed batch
    equal one full reference forward. Returns the greedy tokens."""
    from tests.support.peft_artifacts import greedy_tokens, token_logprobs
    from worker.inference.engine import GenerationRequest

    expected = [greedy_tokens(references[a], p, new_tokens, engine.eos_token_ids) for a, p in jobs]
    alone = [engine.generate(GenerationRequest(p, a, new_tokens, temperature=0.0)).token_ids for a, p in jobs]
    assert alone == expected
    handles = [engine.submit(GenerationRequest(p, a, new_tokens, temperature=0.0)) for a, p in jobs]
    assert [h.result().token_ids for h in handles] == expected
    sampled = [engine.submit(GenerationRequest(p, a, 6, temperature=1.0, seed=i, logprobs=True))
               for i, (a, p) in enumerate(jobs)]
    for (adapter, prompt), handle in zip(jobs, sampled):
        result = handle.result()
        reference = token_logprobs(references[adapter], prompt, result.token_ids)
        assert result.logprobs == pytest.approx(reference, abs=2e-4), f"adapter {adapter}"
    return expected


def assert_changes_logits(adapted, base, prompt: list[int], at_least: float = 0.1) -> None:
    """The adapted reference model's logits really differ from the base's (so parity checks mean something)."""
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        adapted_logits = adapted(input_ids=ids).logits[0, -len(prompt):]
        base_logits = base(input_ids=ids).logits[0]
    assert (adapted_logits - base_logits).abs().max() > at_least
