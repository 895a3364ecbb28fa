"""Artifacts of every served kind with non-trivial random weights, and references that generate with them.

peft kinds are built by peft itself (`get_peft_model` + `save_pretrained`); the bottleneck and sparse
formats (ours) are written directly with safetensors, as the contract describes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def save_peft_artifact(model_dir: Path, dest: Path, config, *, seed: int = 0, noise: float = 0.5,
                       around_one: bool = False) -> Path:
    """Save a peft adapter built from `config` whose trainable weights get random noise.

    `around_one`: weights become 1 + noise * N(0, 1) (IA3 gains) instead of w + noise * N(0, 1).
    """
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.requires_grad:
                param.copy_((1.0 if around_one else param) + noise * torch.randn_like(param))
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def save_trained_adalora(model_dir: Path, dest: Path, *, seed: int = 0, steps: int = 6) -> Path:
    """An AdaLoRA adapter after a few SGD steps with `update_and_allocate`, so it has a pruned rank_pattern."""
    from peft import AdaLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = AdaLoraConfig(init_r=6, target_r=3, tinit=0, tfinal=0, deltaT=1, total_step=steps - 1, lora_alpha=16,
                           target_modules=["q_proj", "v_proj", "down_proj", "up_proj"])
    model = get_peft_model(base, config)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = torch.randint(0, 2000, (2, 16))
    for step in range(steps):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad()
    with torch.no_grad():  # bigger singular values so that the adapter changes greedy outputs
        for name, param in model.named_parameters():
            if "lora_E" in name:
                param.copy_(torch.randn_like(param) * 60)
    model.save_pretrained(dest, safe_serialization=True)
    return dest


def save_bottleneck(dest: Path, *, hidden: int, layers: int, size: int = 8, placement=("attention", "mlp"),
                    activation: str = "gelu", scaling: float = 2.0, seed: int = 0) -> Path:
    """A `patchbay.bottleneck/v1` folder with random (non-zero) down and up projections."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for where in placement:
            tensors[f"layers.{i}.{where}.down.weight"] = torch.randn(size, hidden, generator=generator) * 0.5
            tensors[f"layers.{i}.{where}.down.bias"] = torch.randn(size, generator=generator) * 0.1
            tensors[f"layers.{i}.{where}.up.weight"] = torch.randn(hidden, size, generator=generator) * 0.5
            tensors[f"layers.{i}.{where}.up.bias"] = torch.randn(hidden, generator=generator) * 0.1
    dest.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "BOTTLENECK_ADAPTER", "format": "patchbay.bottleneck/v1", "bottleneck_size": size,
              "placement": list(placement), "activation": activation, "scaling": scaling, "hidden_size": hidden,
              "num_layers": layers, "base_model_name_or_path": "tiny"}
    (dest / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


def add_sparse_deltas(folder: Path, deltas: dict[str, torch.Tensor], *, added: tuple[str, ...] = (),
                      kind: str = "modules") -> Path:
    """Write sparse-delta files beside an artifact with the training side's writer (`worker.formats.sparse_deltas`):
    `deltas` by parameter name; names in `added` are biases the base lacks. Mostly-zero deltas are stored as
    indices, the others dense (the writer picks the smaller)."""
    from worker.formats.sparse_deltas import ParamDelta, write_sparse_deltas

    params = {name: ParamDelta(delta, added=name in added) for name, delta in deltas.items()}
    write_sparse_deltas(folder, kind, params, candidate_entries=sum(d.numel() for d in deltas.values()))
    return folder


def reference_model(model_dir: Path, adapter_dir: Path | None, *, quantization: str = "none",
                    sparse: bool = False, bottleneck: bool = False):
    """The base (fp32, or 4-bit NF4 + DQ) with the artifact applied as training applies it: by peft, or for the
    bottleneck format by `bottleneck_module`; `sparse`: its sparse deltas (`sparse_apply`) change the
    base parameters first."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from worker.training.methods.bottleneck_module import load_bottleneck_adapters
    from worker.training.techniques.sparse_apply import apply_sparse_deltas

    kwargs = {}
    if quantization == "nf4-dq":
        kwargs = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32), "device_map": {"": "cpu"}}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, **kwargs).eval()
    if sparse:
        apply_sparse_deltas(model, adapter_dir)
    if adapter_dir is not None and bottleneck:
        load_bottleneck_adapters(model, adapter_dir)
    elif adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    return model


def greedy_tokens(model, prompt: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    """Greedy tokens by full forward passes of the reference model (no KV cache), cut before end-of-sequence.

    Not `generate`: with transformers 5.24, peft 0.21.2's generate passes the prefix as `past_key_values`,
    which the model ignores in favour of its own `cache`, so prefix tuning would silently vanish.
    """
    tokens: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(input_ids=torch.tensor([prompt + tokens])).logits[0, -1].argmax())
            if token in eos_ids:
                break
            tokens.append(token)
    return tokens


def token_logprobs(model, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probabilities of `completion` after `prompt` from one full forward (virtual-token positions,
    which peft's prompt/p-tuning forward puts first, are dropped)."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
    logits = logits[logits.shape[0] - ids.shape[1]:]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(completion)]
