"""Bottleneck adapters in a training model: identity at start, placement after attention/MLP, saving and
reloading, validation, 4-bit bases."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.support.tiny_training import load_tiny
from worker.formats.bottleneck import BottleneckConfig, BottleneckFormatError, read_bottleneck_folder
from worker.training.methods.bottleneck_module import (
    attach_bottleneck_adapters,
    config_for_model,
    load_bottleneck_adapters,
    save_bottleneck_adapters,
)

IDS = torch.tensor([[5, 900, 17, 4242, 33, 8, 1200, 77]])


def _config(model, **overrides) -> BottleneckConfig:
    options = dict(bottleneck_size=8, placement=["attention", "mlp"], activation="gelu", scaling=1.5,
                   base_model_name_or_path="tiny")
    options.update(overrides)
    return config_for_model(model, **options)


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _perturb(adapters, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in adapters.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


@pytest.mark.parametrize("quantization", ["none", "nf4-dq"])
def test_untrained_adapters_are_the_identity(tiny_model_dir, quantization):
    model = load_tiny(tiny_model_dir, quantization=quantization)
    before = _logits(model)
    adapters = attach_bottleneck_adapters(model, _config(model), dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in adapters.parameters())
    torch.testing.assert_close(_logits(model), before, atol=0, rtol=0)


def test_adapters_follow_attention_and_mlp_before_the_residual_and_can_be_detached(tiny_model_dir):
    model = load_tiny(tiny_model_dir)
    base = _logits(model)
    layer = model.model.layers[1]
    seen = {}

    def remember_input(module, args, kwargs):
        seen["layer_in"] = (args[0] if args else kwargs["hidden_states"]).clone()

    layer.register_forward_pre_hook(remember_input, with_kwargs=True)
    # Registered before the adapters' hooks, so these see the blocks' own outputs.
    layer.self_attn.register_forward_hook(lambda m, a, out: seen.__setitem__("attn", out[0].clone()))
    layer.mlp.register_forward_hook(lambda m, a, out: seen.__setitem__("mlp", out.clone()))
    layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("mid", a[0].clone()))
    layer.register_forward_hook(lambda m, a, out: seen.__setitem__("layer_out", out.clone()))

    adapters = attach_bottleneck_adapters(model, _config(model), dtype=torch.float32)
    _perturb(adapters)
    adapted = _logits(model)

    def expected(place: str, h: torch.Tensor) -> torch.Tensor:
        adapter = adapters.layers[1][place]
        return h + 1.5 * adapter.up(torch.nn.functional.gelu(adapter.down(h)))

    with torch.no_grad():
        torch.testing.assert_close(seen["mid"], seen["layer_in"] + expected("attention", seen["attn"]))
        torch.testing.assert_close(seen["layer_out"], seen["mid"] + expected("mlp", seen["mlp"]))
    assert not torch.allclose(adapted, base)
    adapters.detach_hooks()
    torch.testing.assert_close(_logits(model), base, atol=0, rtol=0)


def test_save_read_and_load_round_trip(tiny_model_dir, tmp_path):
    model = load_tiny(tiny_model_dir)
    adapters = attach_bottleneck_adapters(model, _config(model), dtype=torch.float32)
    _perturb(adapters)
    trained = _logits(model)
    save_bottleneck_adapters(adapters, tmp_path / "artifact")

    config = json.loads((tmp_path / "artifact" / "adapter_config.json").read_text())
    assert config == {"peft_type": "BOTTLENECK_ADAPTER", "format": "patchbay.bottleneck/v1", "bottleneck_size": 8,
                      "placement": ["attention", "mlp"], "activation": "gelu", "scaling": 1.5, "hidden_size": 64,
                      "num_layers": 2, "base_model_name_or_path": "tiny"}
    tensors = load_file(tmp_path / "artifact" / "adapter_model.safetensors")
    assert tensors["layers.1.mlp.down.weight"].shape == (8, 64)
    assert tensors["layers.1.mlp.down.bias"].shape == (8,)
    assert tensors["layers.0.attention.up.weight"].shape == (64, 8)
    assert tensors["layers.0.attention.up.bias"].shape == (64,)
    assert len(tensors) == 2 * 2 * 4

    read_config, read_tensors = read_bottleneck_folder(tmp_path / "artifact")
    assert read_config.placement == ("attention", "mlp") and read_tensors.keys() == tensors.keys()
    fresh = load_tiny(tiny_model_dir)
    loaded = load_bottleneck_adapters(fresh, tmp_path / "artifact")
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(_logits(fresh), trained, atol=0, rtol=0)


def _write(folder, config: dict, tensors: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "adapter_model.safetensors")


def test_read_refuses_malformed_folders(tiny_model_dir, tmp_path):
    model = load_tiny(tiny_model_dir)
    adapters = attach_bottleneck_adapters(model, _config(model, placement=["mlp"]), dtype=torch.float32)
    good_config = adapters.config.to_json()
    good = {k: v.clone() for k, v in adapters.state_dict().items()}

    with pytest.raises(BottleneckFormatError, match="lacks adapter_config.json"):
        read_bottleneck_folder(tmp_path / "empty")
    cases = {
        "peft_type": ({**good_config, "peft_type": "LORA"}, good),
        "activation must be one of": ({**good_config, "activation": "swish"}, good),
        "placement must be": ({**good_config, "placement": ["ffn"]}, good),
        "missing": (good_config, {k: v for k, v in good.items() if k != "layers.1.mlp.up.bias"}),
        "unexpected": (good_config, {**good, "layers.0.attention.up.bias": torch.zeros(64)}),
        "has shape": (good_config, {**good, "layers.0.mlp.down.weight": torch.zeros(8, 65)}),
        "floating-point": (good_config, {**good, "layers.0.mlp.up.bias": torch.zeros(64, dtype=torch.long)}),
    }
    for i, (message, (config, tensors)) in enumerate(cases.items()):
        _write(tmp_path / f"case{i}", config, tensors)
        with pytest.raises(BottleneckFormatError, match=message):
            read_bottleneck_folder(tmp_path / f"case{i}")

    _write(tmp_path / "other-model", {**good_config, "num_layers": 3},
           {**good, **{k.replace("layers.1", "layers.2"): v.clone() for k, v in good.items() if "layers.1" in k}})
    with pytest.raises(BottleneckFormatError, match="the model has 2 layers"):
        load_bottleneck_adapters(load_tiny(tiny_model_dir), tmp_path / "other-model")


def test_on_a_4bit_base_only_adapters_get_gradients_in_every_layer(tiny_model_dir):
    model = load_tiny(tiny_model_dir, quantization="nf4-dq")
    adapters = attach_bottleneck_adapters(model, _config(model), dtype=torch.float32)
    _perturb(adapters)
    model(input_ids=IDS, labels=IDS).loss.backward()
    for name, param in adapters.named_parameters():
        assert param.grad is not None and param.grad.abs().max() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if "patchbay_bottleneck" not in n)
