"""Choose the next token from one row of logits: greedy, or temperature + top-p with a per-request generator."""

from __future__ import annotations

import torch


def choose_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """The next token id from a float32 CPU logits vector.

    Temperature 0 is greedy (argmax). Otherwise the distribution softmax(logits / temperature) is cut
    to its smallest top-p nucleus and sampled with `generator`, so a seeded generator gives the same
    tokens whatever else shares the batch.
    """
    if temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the tokens ranked above
        sorted_probs = torch.where(before < top_p, sorted_probs, torch.zeros_like(sorted_probs))
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token_id: int) -> float:
    """log p(token) under the model's own distribution (before temperature and top-p)."""
    return float(torch.log_softmax(logits, dim=-1)[token_id])


def make_generator(seed: int | None) -> torch.Generator:
    """A CPU generator seeded with `seed`, or from fresh entropy when None."""
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
