"""Chunked lm_head log-probabilities: equal to the unchunked path (values and gradients), never N x V."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from worker.training.chunked_loss import (
    DEFAULT_CHUNK_TOKENS,
    can_chunk,
    chunked_token_logps,
    unchunked_token_logps,
)

N, H, V = 300, 64, 5003


def _case(*, bias: bool, seed: int = 0):
    torch.manual_seed(seed)
    head = nn.Linear(H, V, bias=bias)
    hidden = torch.randn(N, H) * 2
    targets = torch.randint(0, V, (N,))
    return head, hidden, targets


def _run(fn, head, hidden, targets, **kwargs):
    """(log-probs, grads of hidden / weight / bias) of a non-uniform weighting of the log-probs."""
    hidden = hidden.clone().requires_grad_(True)
    head.zero_grad(set_to_none=True)
    logps = fn(hidden, head, targets, **kwargs)
    weights = torch.linspace(-1.0, 2.0, len(logps))
    (logps * weights).sum().backward()
    bias_grad = head.bias.grad if head.bias is not None else None
    return logps.detach(), hidden.grad, head.weight.grad, bias_grad


@pytest.mark.parametrize("chunk", [1, 7, 128, N, 4096])
@pytest.mark.parametrize("train_head", [False, True])
def test_matches_unchunked_values_and_gradients(chunk, train_head):
    head, hidden, targets = _case(bias=train_head)
    head.requires_grad_(train_head)
    expected = _run(unchunked_token_logps, head, hidden, targets)
    got = _run(chunked_token_logps, head, hidden, targets, chunk_tokens=chunk)
    assert got[0].dtype == torch.float32 and got[0].shape == (N,)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[0].sum(), expected[0].sum(), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=1e-5)
    if train_head:
        torch.testing.assert_close(got[2], expected[2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[3], expected[3], atol=1e-5, rtol=1e-5)
    else:
        assert got[2] is None and expected[2] is None


def test_bfloat16_hidden_matches_unchunked_and_returns_float32():
    head, hidden, targets = _case(bias=False)
    head = head.to(torch.bfloat16)
    hidden = hidden.to(torch.bfloat16)
    expected = _run(unchunked_token_logps, head, hidden, targets)
    got = _run(chunked_token_logps, head, hidden, targets, chunk_tokens=64)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], expected[1], atol=1e-2, rtol=1e-2)


class _LargestOutput(TorchDispatchMode):
    """Records the largest numel of any tensor an aten op returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.largest = max(self.largest, tensor.numel())
        return out


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_path_never_creates_an_n_by_v_tensor(train_head):
    head, hidden, targets = _case(bias=train_head)
    head.requires_grad_(train_head)
    chunk = 64
    sizes = {}
    for name, fn, kwargs in [("chunked", chunked_token_logps, {"chunk_tokens": chunk}),
                             ("unchunked", unchunked_token_logps, {})]:
        with _LargestOutput() as mode:
            _run(fn, head, hidden, targets, **kwargs)
        sizes[name] = mode.largest
    assert sizes["unchunked"] >= N * V
    assert chunk * V <= sizes["chunked"] <= max(chunk, H) * V < N * V


def test_falls_back_for_heads_it_cannot_chunk():
    head, hidden, targets = _case(bias=False)
    assert can_chunk(head, hidden)
    assert not can_chunk(head, hidden.double())  # dtype mismatch
    hooked = nn.Linear(H, V)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    assert not can_chunk(hooked, hidden)

    class Scaled(nn.Linear):
        def forward(self, x):
            return super().forward(x) / 3

    scaled = Scaled(H, V)
    assert not can_chunk(scaled, hidden)
    for module in (hooked, scaled):  # the fallback is the module's own forward
        torch.testing.assert_close(
            chunked_token_logps(hidden, module, targets, chunk_tokens=7),
            unchunked_token_logps(hidden, module, targets),
        )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not can_chunk(head, hidden)
    with pytest.raises(ValueError):
        chunked_token_logps(hidden, head, targets, chunk_tokens=0)
    assert DEFAULT_CHUNK_TOKENS >= 1


def test_empty_selection():
    head, hidden, targets = _case(bias=False)
    logps = chunked_token_logps(hidden[:0].requires_grad_(True), head, targets[:0])
    assert logps.shape == (0,) and float(logps.detach().sum()) == 0.0


# ---- the tiny model with LoRA ----------------------------------------------------------------------


def _lora_model(tiny_model_dir, target_modules):
    from peft import LoraConfig, get_peft_model

    from tests.support.tiny_training import load_tiny

    model = get_peft_model(load_tiny(tiny_model_dir), LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make A's gradient non-zero too
            nn.init.normal_(param, std=0.05)
    return model


def _tiny_loss_and_grads(model, input_ids, targets, **kwargs):
    causal_lm = model.get_base_model()
    model.zero_grad(set_to_none=True)
    hidden = causal_lm.get_decoder()(input_ids=input_ids, use_cache=False).last_hidden_state
    labelled = targets != -100
    fn = chunked_token_logps if kwargs else unchunked_token_logps
    logps = fn(hidden[labelled], causal_lm.get_output_embeddings(), targets[labelled], **kwargs)
    loss = -logps.sum()
    loss.backward()
    grads = {name: param.grad.clone() for name, param in model.named_parameters() if param.requires_grad}
    return loss.detach(), grads


def _tiny_batch(vocab):
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab, (2, 40), generator=generator)
    targets = torch.full_like(input_ids, -100)
    targets[:, 10:-1] = input_ids[:, 11:]
    return input_ids, targets


@pytest.mark.parametrize("train_embeddings", [False, True])
def test_tiny_lora_model_loss_and_gradients_match(tiny_model_dir, train_embeddings):
    model = _lora_model(tiny_model_dir, ["q_proj", "v_proj", "down_proj"])
    head = model.get_base_model().get_output_embeddings()
    assert can_chunk(head, head.weight)
    if train_embeddings:  # tied: lm_head's weight is the input embedding, which now trains too
        head.weight.requires_grad_(True)
    input_ids, targets = _tiny_batch(head.out_features)
    expected_loss, expected = _tiny_loss_and_grads(model, input_ids, targets)
    loss, grads = _tiny_loss_and_grads(model, input_ids, targets, chunk_tokens=16)
    torch.testing.assert_close(loss, expected_loss, atol=1e-4, rtol=1e-6)
    assert grads.keys() == expected.keys() and len(grads) == 12 + train_embeddings
    for name in grads:
        assert expected[name].abs().sum() > 0, name
        torch.testing.assert_close(grads[name], expected[name], atol=1e-5, rtol=1e-4, msg=name)


def test_tiny_lora_on_lm_head_falls_back(tiny_model_dir):
    model = _lora_model(tiny_model_dir, ["q_proj", "lm_head"])
    head = model.get_base_model().get_output_embeddings()
    assert not can_chunk(head, head.base_layer.weight)
    input_ids, targets = _tiny_batch(head.base_layer.out_features)
    expected_loss, expected = _tiny_loss_and_grads(model, input_ids, targets)
    loss, grads = _tiny_loss_and_grads(model, input_ids, targets, chunk_tokens=16)
    torch.testing.assert_close(loss, expected_loss)
    assert any("lm_head" in name for name in grads)
    for name in grads:
        torch.testing.assert_close(grads[name], expected[name], msg=name)


def test_the_recipe_trains_the_same_with_and_without_chunks(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from tests.worker.training.test_training_recipe import RecordingContext, make_job
    from worker.training.recipe import FineTuneRecipe

    results = {}
    for chunk in (None, 5):
        job = make_job(tiny_model_dir, tmp_path / f"work-{chunk}", dropout=0.0, max_steps=3, quantization="none",
                       method="lora")
        recipe = FineTuneRecipe(job, RecordingContext(tmp_path / f"store-{chunk}"), loss_chunk_tokens=chunk)
        try:
            recipe.setup()
            result = recipe.train()
        finally:
            recipe.cleanup()
        results[chunk] = (result.metrics, load_file(result.adapter_dir / "adapter_model.safetensors"))
    (plain, plain_weights), (chunked, chunked_weights) = results[None], results[5]
    assert chunked["first_train_loss"] == pytest.approx(plain["first_train_loss"], abs=1e-5)
    assert chunked["train_loss"] == pytest.approx(plain["train_loss"], abs=1e-5)
    for name, weight in plain_weights.items():
        torch.testing.assert_close(chunked_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)
