"""Adapter kinds as routing sees them: what an adapter version needs from a replica's engine.

An adapter's kinds are its training method (`qlora`, `lora`, `dora`, `ia3`, …) plus `sparse` when it
carries sparse deltas. A replica advertises the kinds its engine serves; the API sends an adapter only
to replicas that serve all of its kinds.
"""

from __future__ import annotations

from core.schemas.peft_methods import PeftMethod

SPARSE_KIND = "sparse"
PATCHBAY_ENGINE_KINDS: tuple[str, ...] = (*PeftMethod.__args__, SPARSE_KIND)
"""Our engine serves every method Patchbay trains or imports, and sparse deltas beside any of them."""
VLLM_ENGINE_KINDS: tuple[str, ...] = ("qlora", "lora")
"""vLLM serves plain LoRA factors (trained with or without a 4-bit base): no DoRA, IA3, prompts, …"""
ENGINE_KINDS = {"patchbay": PATCHBAY_ENGINE_KINDS, "vllm": VLLM_ENGINE_KINDS}


def adapter_kinds(method: str, techniques: dict | None) -> list[str]:
    """The kinds an adapter version needs its replica to serve."""
    kinds = [method]
    if (techniques or {}).get(SPARSE_KIND):
        kinds.append(SPARSE_KIND)
    return kinds


def engines_serving(kinds: list[str]) -> list[str]:
    """The engines that serve every one of `kinds`."""
    return [engine for engine, served in ENGINE_KINDS.items() if set(kinds) <= set(served)]
