"""Turn examples into token ids and loss labels, and group each optimizer step's examples into rows.

Labels follow the transformers convention: `labels[t]` is the token at position t when the loss
covers it, else -100. Rows carry *next-token targets* (`targets[t]` is what position t must
predict), shifted per example, so a packed row never asks one example to predict the next one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from core.datasets import Example, Message

IGNORE_INDEX = -100


@dataclass
class TokenizedExample:
    """One example's token ids and labels (already truncated)."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        """Number of real tokens."""
        return len(self.input_ids)

    @property
    def n_labelled(self) -> int:
        """Number of tokens the loss covers (each is predicted from the token before it)."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)

    def next_token_targets(self) -> list[int]:
        """What each position must predict: the next token's label, and -100 at the last position."""
        return self.labels[1:] + [IGNORE_INDEX]


@dataclass
class TokenizedDataset:
    """Tokenized examples plus what tokenization had to change."""

    examples: list[TokenizedExample]
    n_truncated: int
    n_dropped: int
    """Examples left with no labelled token after truncation; they are not in `examples`."""


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[Message], *, generation_prompt: bool) -> str:
    conversation = [{"role": m.role, "content": m.content} for m in messages]
    return tokenizer.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=generation_prompt
    )


def _assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[Message], full: str
) -> list[tuple[int, int]]:
    """Character spans of `full` to train on: each weight-1 assistant reply and its end-of-turn token.

    The span of assistant turn i starts where the rendering of turns [0, i) plus the generation
    prompt ends, and stops after the last non-space character of the rendering of turns [0, i].
    When the template does not render prefixes as prefixes of the whole (e.g. a default system
    prompt that appears only once there are messages), the reply's text is searched for instead.
    """
    spans = []
    cursor = 0
    eos = tokenizer.eos_token or ""
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        start = end = -1
        if i > 0:
            before = _render(tokenizer, messages[:i], generation_prompt=True)
            through = _render(tokenizer, messages[: i + 1], generation_prompt=False).rstrip()
            if full.startswith(before) and full.startswith(through) and len(through) > len(before):
                start, end = len(before), len(through)
        if start < 0:
            start = full.find(message.content, cursor)
            if start < 0:
                raise ValueError(f"the chat template dropped assistant message {i}")
            end = start + len(message.content)
            if eos and full.startswith(eos, end):
                end += len(eos)
        cursor = end
        if message.weight:
            spans.append((start, end))
    return spans


def _label_char_spans(
    tokenizer: PreTrainedTokenizerBase, text: str, spans: list[tuple[int, int]], train_on_inputs: bool
) -> tuple[list[int], list[int]]:
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    labels = []
    for token_id, (tok_start, tok_end) in zip(ids, encoded["offset_mapping"]):
        inside = any(tok_start < end and tok_end > start for start, end in spans)
        labels.append(token_id if inside else IGNORE_INDEX)
    return ids, labels


def _encode_plain(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int, train_on_inputs: bool
) -> TokenizedExample:
    """Tokenize one example, label what the loss covers, and truncate it to `max_seq_length` tokens.

    - chat / alpaca: the chat template; weight-1 assistant turns and their end-of-turn token.
    - prompt_completion: prompt tokens then completion tokens plus EOS; the completion and EOS.
    - text: the text plus EOS; every token.
    - preference: refused (a ValueError); the DPO recipe tokenizes its pairs itself.
    `train_on_inputs` labels every token of chat, alpaca and prompt_completion examples too.
    """
    eos_id = tokenizer.eos_token_id
    if example.format in ("chat", "alpaca"):
        full = _render(tokenizer, example.messages, generation_prompt=False)
        spans = _assistant_char_spans(tokenizer, example.messages, full)
        ids, labels = _label_char_spans(tokenizer, full, spans, train_on_inputs)
    elif example.format == "prompt_completion":
        prompt = _encode_plain(tokenizer, example.prompt)
        completion = _encode_plain(tokenizer, example.completion) + [eos_id]
        ids = prompt + completion
        labels = (prompt if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + completion
    elif example.format == "text":
        ids = _encode_plain(tokenizer, example.text) + [eos_id]
        labels = list(ids)
    elif example.format == "preference":
        raise ValueError("preference examples are chosen/rejected pairs: supervised tokenization cannot train them")
    else:
        raise ValueError(f"unknown example format {example.format!r}")
    truncated = len(ids) > max_seq_length
    return TokenizedExample(ids[:max_seq_length], labels[:max_seq_length], truncated)


def tokenize_dataset(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int, train_on_inputs: bool
) -> TokenizedDataset:
    """Tokenize every example; drop (and count) those truncation left without a labelled token."""
    kept, n_truncated, n_dropped = [], 0, 0
    for example in examples:
        tokenized = tokenize_example(
            example, tokenizer, max_seq_length=max_seq_length, train_on_inputs=train_on_inputs
        )
        n_truncated += tokenized.truncated
        if tokenized.n_labelled == 0:
            n_dropped += 1
            continue
        kept.append(tokenized)
    return TokenizedDataset(kept, n_truncated, n_dropped)


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch, a pure function of (seed, epoch)."""
    order = list(range(n_examples))
    random.Random(f"patchbay:{seed}:{epoch}").shuffle(order)
    return order


def step_batches(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The example indices of each optimizer step of one epoch (the last may be smaller)."""
    order = epoch_order(n_examples, seed, epoch)
    return [order[i : i + batch_size] for i in range(0, n_examples, batch_size)]


@dataclass
class Row:
    """One forward pass: a packed row (batch 1, `segment_lengths` set) or a padded micro-batch."""

    input_ids: torch.Tensor  # (B, L) int64
    targets: torch.Tensor  # (B, L) int64, next-token targets, -100 where no loss
    position_ids: torch.Tensor | None  # packed rows: restarts at 0 for each example
    attention_mask: torch.Tensor | None  # padded micro-batches: 1 on real tokens
    segment_lengths: list[int] | None  # packed rows: each example's length, in order
    n_real_tokens: int
    n_labelled: int


def packed_row(examples: list[TokenizedExample]) -> Row:
    """One padding-free row of the examples in order, each in an attention segment of its own."""
    ids, targets, positions = [], [], []
    for example in examples:
        ids += example.input_ids
        targets += example.next_token_targets()
        positions += range(example.n_tokens)
    return Row(
        input_ids=torch.tensor([ids], dtype=torch.long),
        targets=torch.tensor([targets], dtype=torch.long),
        position_ids=torch.tensor([positions], dtype=torch.long),
        attention_mask=None,
        segment_lengths=[e.n_tokens for e in examples],
        n_real_tokens=len(ids),
        n_labelled=sum(e.n_labelled for e in examples),
    )


def padded_batch(examples: list[TokenizedExample], pad_id: int) -> Row:
    """A micro-batch of the examples in order, right-padded to the longest."""
    longest = max(e.n_tokens for e in examples)
    ids = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for i, example in enumerate(examples):
        n = example.n_tokens
        ids[i, :n] = torch.tensor(example.input_ids)
        targets[i, :n] = torch.tensor(example.next_token_targets())
        mask[i, :n] = 1
    return Row(
        input_ids=ids,
        targets=targets,
        position_ids=None,
        attention_mask=mask,
        segment_lengths=None,
        n_real_tokens=sum(e.n_tokens for e in examples),
        n_labelled=sum(e.n_labelled for e in examples),
    )


def build_rows(
    examples: list[TokenizedExample], *, packing: bool, row_token_cap: int, pad_id: int
) -> list[Row]:
    """Group one optimizer step's examples into forward passes of at most `row_token_cap` tokens.

    With packing, examples are concatenated (in the given order) into padding-free rows;
    without it, examples sorted by length form padded micro-batches whose padded size fits
    the cap. An example longer than the cap gets a row of its own.
    """
    if packing:
        groups: list[list[TokenizedExample]] = [[]]
        size = 0
        for example in examples:
            if groups[-1] and size + example.n_tokens > row_token_cap:
                groups.append([])
                size = 0
            groups[-1].append(example)
            size += example.n_tokens
        return [packed_row(group) for group in groups if group]
    groups = [[]]
    for example in sorted(examples, key=lambda e: e.n_tokens):
        # Sorted ascending, so the newcomer is the longest: the padded size is count x its length.
        if groups[-1] and (len(groups[-1]) + 1) * example.n_tokens > row_token_cap:
            groups.append([])
        groups[-1].append(example)
    return [padded_batch(group, pad_id) for group in groups if group]
