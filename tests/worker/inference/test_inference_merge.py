"""Merged serving: one adapter folded into a full-precision base matches the unmerged adapter."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.worker.inference.conftest import load_peft_reference
from worker.formats.files import AdapterLoadError
from worker.inference.engine import GenerationRequest, InferenceEngine
from worker.inference.merge import load_merged_model, merge_lora_into, save_merged_model


@pytest.mark.parametrize("adapter", ["A", "B"])
def test_merged_logits_match_the_unmerged_adapter(adapter, tiny_model_dir, lora_dirs, prompts):
    merged, _ = load_merged_model(tiny_model_dir, lora_dirs[adapter], device="cpu")
    linears = [m for m in merged.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is nn.Linear for m in linears)  # no LoRA modules left
    assert not any("lora" in name for name, _ in merged.named_parameters())
    reference = load_peft_reference(tiny_model_dir, lora_dirs, "none", names=(adapter,))
    input_ids = torch.tensor([prompts[3]])
    with torch.no_grad():
        expected = reference(input_ids=input_ids).logits
        torch.testing.assert_close(merged(input_ids=input_ids).logits, expected, atol=1e-4, rtol=0)
        with reference.disable_adapter():
            base = reference(input_ids=input_ids).logits
    assert (base - expected).abs().max() > 0.1  # the merge changed the model


def test_a_saved_merged_model_serves_like_the_adapter(tiny_model_dir, lora_dirs, prompts, tmp_path, fp32_engine):
    folder = save_merged_model(tiny_model_dir, lora_dirs["C"], tmp_path / "merged-C")
    expected = fp32_engine.generate(GenerationRequest(prompts[1], "C", 16, temperature=0.0)).token_ids
    with InferenceEngine(folder, quantization="none", max_loaded_adapters=1) as dedicated:
        result = dedicated.generate(GenerationRequest(prompts[1], None, 16, temperature=0.0))
    assert result.token_ids == expected


def test_merging_into_a_4bit_base_is_refused(tiny_model_dir, lora_dirs):
    from worker.base_loading import load_base_model
    from worker.device import choose_device

    model = load_base_model(tiny_model_dir, "nf4-dq", choose_device("cpu"), training=False)
    with pytest.raises(AdapterLoadError, match="full precision"):
        merge_lora_into(model, lora_dirs["A"])
