"""Which decoder linears a sparse spec trains, and which must therefore stay out of 4-bit quantization."""

from __future__ import annotations

from pathlib import Path

import torch

from core.schemas.peft_methods import SparseSpec
from worker.model_parts import decoder_linears


def names_module(qualified_name: str, entry: str) -> bool:
    """Whether `entry` names the module `qualified_name` or one of its ancestors, in full or as a dotted
    suffix: `mlp.down_proj`, `layers.1` and `model.layers.1.mlp.down_proj` all name
    `model.layers.1.mlp.down_proj` (`layers.1` does not name `model.layers.11.mlp.down_proj`)."""
    parts, wanted = qualified_name.split("."), entry.strip(".").split(".")
    n = len(wanted)
    return any(parts[end - n:end] == wanted for end in range(n, len(parts) + 1))


def chosen_linears(linears: dict[str, torch.nn.Linear], spec: SparseSpec) -> dict[str, torch.nn.Linear]:
    """The linears whose weights train: `modules` for kinds modules/top_k (top_k: every one when unset);
    every linear for bitfit (which trains their biases). Raises ValueError for an entry naming none."""
    if spec.kind == "bitfit" or not spec.modules:
        return dict(linears)
    unmatched = [entry for entry in spec.modules if not any(names_module(name, entry) for name in linears)]
    if unmatched:
        examples = ", ".join(list(linears)[:3])
        raise ValueError(f"peft.sparse.modules: {', '.join(map(repr, unmatched))} names no decoder linear "
                         f"(they are named like {examples})")
    return {name: linear for name, linear in linears.items()
            if any(names_module(name, entry) for entry in spec.modules)}


def quantization_skip_modules(spec: SparseSpec | None, base_model_path: str | Path) -> list[str] | None:
    """Module names to pass as `BitsAndBytesConfig(llm_int8_skip_modules=...)` on a 4-bit base, or None.

    Kinds `modules` and `top_k` train base weights, which must stay in full precision. transformers
    drops its own default skips (lm_head, tied weights) once a list is given, so they are included.
    The names are exact module names (transformers matches a name from its start up to a dot, or as
    a suffix). None (keep transformers' defaults) when there is no sparse spec or for bitfit.
    """
    if spec is None or spec.kind == "bitfit":
        return None
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert

    config = AutoConfig.from_pretrained(base_model_path, trust_remote_code=False)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    chosen = chosen_linears(decoder_linears(skeleton), spec)
    return sorted(set(get_keys_to_not_convert(skeleton)) | set(chosen))
