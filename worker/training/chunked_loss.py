"""Per-token log-probabilities through lm_head, computed in chunks of labelled tokens.

For N labelled tokens and a vocabulary of V, the unchunked path (`lm_head(hidden)` then
`F.cross_entropy(logits.float(), ...)`) holds N x V logits, their fp32 copy / softmax and, in
backward, their N x V gradient at once; with SmolLM2 (V = 49,152) and a 2,048-token row that is
~400 MiB per fp32 copy. The chunked path never holds more than one chunk's logits (chunk x V, plus
its softmax/gradient): forward keeps only each token's target log-prob and log-sum-exp, backward
recomputes each chunk's logits and turns them into gradients w.r.t. the hidden states (and w.r.t.
lm_head's weight and bias when those require grad). The cost: one extra lm_head matmul per chunk
in backward (the recomputation), i.e. the head's forward FLOPs once more. When the head is frozen
(LoRA and most methods) even that is saved: each log-prob depends on its own token's hidden state
only, so forward already turns each chunk into d logp_i / d hidden_i ([N, H], kept instead of the
hidden states) and backward only scales those rows by the incoming gradient.

Only a plain `nn.Linear` head is chunked, with hidden and weight in the same dtype and autocast
off; anything else (a quantized or peft-wrapped head, a head with hooks) falls back to calling the
module unchunked, so the result is always `-F.cross_entropy(lm_head(hidden).float(), targets)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

# 1024 x 49,152 fp32 logits are 192 MiB (about three such buffers live per chunk), a tenth of a
# 2,048-token row's; a [1024, H] @ [H, V] matmul is still large enough to keep a GPU busy, and
# rows with fewer labelled tokens than this run as a single chunk (no extra launches).
DEFAULT_CHUNK_TOKENS = 1024


def chunked_token_logps(
    hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor, *,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """fp32 log p(target) [N] of the [N, H] hidden states through `lm_head`, `chunk_tokens` rows at a
    time; `chunk_tokens=None`, or a head that `can_chunk` refuses, takes the unchunked path.

    Every target must be a real class (callers select the labelled rows first)."""
    if chunk_tokens is None or not can_chunk(lm_head, hidden):
        return unchunked_token_logps(hidden, lm_head, targets)
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    head_frozen = not lm_head.weight.requires_grad and (lm_head.bias is None or not lm_head.bias.requires_grad)
    if head_frozen and hidden.requires_grad and torch.is_grad_enabled():
        return _FrozenHeadTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_tokens)
    return _ChunkedTokenLogps.apply(hidden, lm_head.weight, lm_head.bias, targets, chunk_tokens)


def unchunked_token_logps(hidden: torch.Tensor, lm_head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The reference: the whole [N, V] logits at once."""
    return -F.cross_entropy(lm_head(hidden).float(), targets, reduction="none")


def can_chunk(lm_head: nn.Module, hidden: torch.Tensor) -> bool:
    """Whether `lm_head(hidden)` is exactly `hidden @ weight.T + bias`: a plain `nn.Linear` (not a
    subclass such as bitsandbytes' Linear4bit, nor a peft wrapper) without hooks or a patched
    forward (accelerate), in the hidden's dtype, with autocast off."""
    return (
        type(lm_head) is nn.Linear
        and not (lm_head._forward_hooks or lm_head._forward_pre_hooks)
        and "forward" not in vars(lm_head) and not hasattr(lm_head, "_hf_hook")
        and lm_head.weight.dtype == hidden.dtype
        and (lm_head.bias is None or lm_head.bias.dtype == hidden.dtype)
        and not torch.is_autocast_enabled(hidden.device.type)
    )


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """One chunk's logits: matmul in the hidden's dtype, then fp32 for the softmax."""
    return F.linear(hidden, weight, bias).float()


def _chunk_logps(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk's (fp32 logits, log-sum-exp, log p(target))."""
    logits = _chunk_logits(hidden, weight, bias)
    lse = torch.logsumexp(logits, dim=-1)
    return logits, lse, logits.gather(1, targets[:, None]).squeeze(1) - lse


def _logp_grad(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """d log_softmax(logits)[target] / d logits = one_hot(target) - softmax, in place of `logits`."""
    grad = logits.sub_(lse[:, None]).exp_().neg_()
    return grad.scatter_add_(1, targets[:, None], torch.ones_like(grad[:, :1]))


class _FrozenHeadTokenLogps(torch.autograd.Function):
    """The same for a frozen head: forward keeps each token's d logp / d hidden, backward scales it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        unit_grad = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            logits, lse, logps[rows] = _chunk_logps(hidden[rows], weight, bias, targets[rows])
            unit_grad[rows] = _logp_grad(logits, lse, targets[rows]).to(hidden.dtype) @ weight
        ctx.save_for_backward(unit_grad)
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps):
        (unit_grad,) = ctx.saved_tensors
        return unit_grad * grad_logps[:, None].to(unit_grad.dtype), None, None, None, None


class _ChunkedTokenLogps(torch.autograd.Function):
    """log_softmax(hidden @ W.T + b)[target] without materialising the [N, V] logits."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_tokens):
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(logps)
        for start in range(0, hidden.shape[0], chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            _, lse[rows], logps[rows] = _chunk_logps(hidden[rows], weight, bias, targets[rows])
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.chunk_tokens = chunk_tokens
        return logps

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # weight/bias gradients accumulate over chunks in fp32
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        for start in range(0, hidden.shape[0], ctx.chunk_tokens):
            rows = slice(start, start + ctx.chunk_tokens)
            grad = _logp_grad(_chunk_logits(hidden[rows], weight, bias), lse[rows], targets[rows])
            grad = grad.mul_(grad_logps[rows, None]).to(hidden.dtype)
            if need_hidden:
                grad_hidden[rows] = grad @ weight
            if need_weight:
                grad_weight += (grad.T @ hidden[rows]).float()
            if need_bias:
                grad_bias += grad.float().sum(0)
        return (
            grad_hidden,
            grad_weight.to(weight.dtype) if need_weight else None,
            grad_bias.to(bias.dtype) if need_bias else None,
            None,
            None,
        )
