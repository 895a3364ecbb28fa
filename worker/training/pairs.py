"""Preference pairs for DPO: tokenize both answers of a pair, and group whole pairs into forward passes.

A pair's chosen and rejected sequences share their prompt. When the longer of the two exceeds
`max_seq_length`, the same number of tokens is cut from the left of both prompts (the answers are
what DPO compares); only an answer that alone is too long loses tokens from its right.

Sequences keep the order chosen, rejected, chosen, rejected, ... within a row, so sequence `2k` is
the chosen answer of the row's pair `k` and `2k + 1` its rejected one. A packed row keeps every
sequence in an attention segment of its own (the pairs stay isolated from each other and within).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from core.datasets import Example, Message
from worker.training.data import IGNORE_INDEX, Row, TokenizedExample, packed_row, padded_batch, tokenize_example


@dataclass
class TokenizedPair:
    """One pair's two sequences, labelled on their answers only."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    truncated: bool = False

    @property
    def n_tokens(self) -> int:
        """Real tokens of both sequences."""
        return self.chosen.n_tokens + self.rejected.n_tokens

    @property
    def input_ids(self) -> list[int]:
        """The chosen sequence's ids (what a probe of the trained model runs on)."""
        return self.chosen.input_ids


@dataclass
class TokenizedPairs:
    """Tokenized pairs plus what truncation had to do."""

    examples: list[TokenizedPair]
    n_truncated: int
    n_dropped: int
    """Pairs left with no answer token (never happens unless max_seq_length is below the prompt's end)."""


@dataclass
class PairRow:
    """A forward pass over whole pairs: `row` holds 2 x len(pair_ids) sequences."""

    row: Row
    pair_ids: list[int]
    """Index of each of the row's pairs in the dataset (or in the step's batch)."""

    def sequence_index(self) -> torch.Tensor:
        """(B, L) the sequence each position belongs to, numbered in the row's order."""
        row = self.row
        if row.segment_lengths is not None:
            lengths = torch.tensor(row.segment_lengths)
            return torch.repeat_interleave(torch.arange(len(lengths)), lengths).unsqueeze(0)
        batch, length = row.input_ids.shape
        return torch.arange(batch).unsqueeze(1).expand(batch, length)


def _answer_start(example: TokenizedExample) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def _cut(example: TokenizedExample, left: int, max_seq_length: int) -> TokenizedExample:
    ids, labels = example.input_ids[left:][:max_seq_length], example.labels[left:][:max_seq_length]
    return TokenizedExample(ids, labels, truncated=len(ids) < example.n_tokens)


def tokenize_pair(
    example: Example, tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> TokenizedPair:
    """Render `input.messages` + each answer with the chat template; truncate the prompts from the left."""
    sequences = [
        tokenize_example(Example(format="chat", messages=[*example.messages, Message("assistant", answer)]),
                         tokenizer, max_seq_length=1 << 30, train_on_inputs=False)
        for answer in (example.chosen, example.rejected)
    ]
    longest = max(s.n_tokens for s in sequences)
    if longest <= max_seq_length:
        return TokenizedPair(*sequences)
    # Keep at least the prompt's last token: it predicts the answer's first one.
    left = min(longest - max_seq_length, min(_answer_start(s) for s in sequences) - 1)
    chosen, rejected = (_cut(s, max(left, 0), max_seq_length) for s in sequences)
    return TokenizedPair(chosen, rejected, truncated=True)


def tokenize_pairs(
    examples: list[Example], tokenizer: PreTrainedTokenizerBase, *, max_seq_length: int
) -> TokenizedPairs:
    """Tokenize every pair; drop (and count) those left without an answer token in either sequence."""
    kept, n_truncated, n_dropped = [], 0, 0
    for example in examples:
        pair = tokenize_pair(example, tokenizer, max_seq_length=max_seq_length)
        n_truncated += pair.truncated
        if pair.chosen.n_labelled == 0 or pair.rejected.n_labelled == 0:
            n_dropped += 1
            continue
        kept.append(pair)
    return TokenizedPairs(kept, n_truncated, n_dropped)


def pair_rows(
    pairs: list[TokenizedPair], pair_ids: list[int], *, packing: bool, row_token_cap: int, pad_id: int
) -> list[PairRow]:
    """Group whole pairs into forward passes of at most `row_token_cap` tokens (padded size without packing).

    A pair larger than the cap gets a row of its own. Without packing, pairs sorted by length form
    padded micro-batches, as supervised rows do.
    """
    order = list(range(len(pairs))) if packing else sorted(range(len(pairs)), key=lambda i: pairs[i].n_tokens)
    groups: list[list[int]] = [[]]
    for i in order:
        group = groups[-1] + [i]
        if packing:
            size = sum(pairs[j].n_tokens for j in group)
        else:
            size = 2 * len(group) * max(max(pairs[j].chosen.n_tokens, pairs[j].rejected.n_tokens) for j in group)
        if groups[-1] and size > row_token_cap:
            groups.append([i])
        else:
            groups[-1] = group
    rows = []
    for group in groups:
        if not group:
            continue
        sequences = [s for j in group for s in (pairs[j].chosen, pairs[j].rejected)]
        row = packed_row(sequences) if packing else padded_batch(sequences, pad_id)
        rows.append(PairRow(row=row, pair_ids=[pair_ids[j] for j in group]))
    return rows
