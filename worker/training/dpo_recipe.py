"""Direct Preference Optimization: the fine-tuning recipe's lifecycle, with a pairwise loss.

For a pair (x, chosen, rejected), with log-probabilities summed over each answer's tokens,
    reward(y) = beta * (log pi(y|x) - log pi_ref(y|x))
    loss      = -log sigmoid(reward(chosen) - reward(rejected)).

The reference is the model as the job starts: the base with the adapter switched off, or the
starting adapter (frozen) for a job that continues from one. Its log-probabilities are computed
once, before the first step, for every training and validation pair, so no second copy of the model
is ever in memory; they travel in each checkpoint, so a resumed job compares against the same
reference exactly.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core.datasets import Example
from worker.training.model import evaluation_mode
from worker.training.pairs import PairRow, TokenizedPairs, pair_rows, tokenize_pairs
from worker.training.recipe import FineTuneRecipe

REFERENCE_FILE = "dpo_reference.safetensors"
"""Checkpoint file with the reference log-probabilities, (pairs, 2) per split: chosen, rejected."""


def dpo_statistics(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> dict[str, torch.Tensor]:
    """Per-pair loss, rewards and margin from (pairs, 2) summed log-probabilities (chosen, rejected)."""
    rewards = beta * (policy - reference)
    margin = rewards[:, 0] - rewards[:, 1]
    return {"loss": -F.logsigmoid(margin), "chosen": rewards[:, 0], "rejected": rewards[:, 1], "margin": margin}


class _Totals:
    """Sums of the per-pair statistics over a step or a validation pass."""

    def __init__(self) -> None:
        self.pairs = 0
        self.sums = {"loss": 0.0, "chosen": 0.0, "rejected": 0.0, "margin": 0.0, "accuracy": 0.0}
        self.chosen_logp = self.chosen_tokens = 0.0

    def add(self, stats: dict[str, torch.Tensor], policy: torch.Tensor, tokens: torch.Tensor) -> None:
        self.pairs += len(stats["margin"])
        for name in ("loss", "chosen", "rejected", "margin"):
            self.sums[name] += stats[name].detach().sum().item()
        self.sums["accuracy"] += (stats["margin"].detach() > 0).sum().item()
        self.chosen_logp += policy[:, 0].detach().sum().item()
        self.chosen_tokens += tokens[:, 0].sum().item()

    def means(self, prefix: str) -> dict[str, float]:
        """`{prefix}loss`, `{prefix}rewards_chosen`, ..., `{prefix}reward_accuracy`, `{prefix}chosen_loss`.

        `chosen_loss` is the supervised loss of the chosen answers (token-mean cross-entropy).
        """
        n = max(self.pairs, 1)
        m = {name: value / n for name, value in self.sums.items()}
        return {f"{prefix}loss": m["loss"], f"{prefix}rewards_chosen": m["chosen"],
                f"{prefix}rewards_rejected": m["rejected"], f"{prefix}reward_margin": m["margin"],
                f"{prefix}reward_accuracy": m["accuracy"],
                f"{prefix}chosen_loss": -self.chosen_logp / max(self.chosen_tokens, 1)}


class DpoRecipe(FineTuneRecipe):
    """DPO on preference pairs, with any `peft.method`; `train_loss` is the DPO loss."""

    def setup(self) -> None:
        """The supervised setup on pairs, then the reference log-probabilities (unless resumed with them)."""
        self.reference: dict[str, torch.Tensor] = {}
        self.step_stats: dict[str, float] = {}
        self.valid_stats: dict[str, float] = {}
        super().setup()
        self.ctx.event(
            f"DPO with beta {self.config.beta}: "
            + ("pairs packed, each sequence in its own attention segment" if self.config.peft.packing
               else "pairs in padded micro-batches (packing is off)"),
            data={"beta": self.config.beta, "packing": bool(self.config.peft.packing)},
        )
        if "train" not in self.reference:
            starting = self.job.start_adapter_dir is not None
            self.reference["train"] = self._reference_logps(self.train_data, through_adapter=starting)
            if self.valid_data is not None and self.valid_data.examples:
                self.reference["valid"] = self._reference_logps(self.valid_data, through_adapter=starting)
            self.ctx.event("reference log-probabilities computed from "
                           + ("the starting adapter" if starting else "the base model (adapter off)"),
                           data={"reference": "start_adapter" if starting else "base"})

    def _tokenize(self, examples: list[Example]) -> TokenizedPairs:
        return tokenize_pairs(examples, self.tokenizer, max_seq_length=self.config.peft.max_seq_length)

    def _report_truncation(self) -> None:
        data = {"truncated_pairs": self.train_data.n_truncated, "dropped_pairs": self.train_data.n_dropped,
                "max_seq_length": self.config.peft.max_seq_length}
        message = (f"{self.train_data.n_truncated} of {len(self.job.training_examples)} preference pairs were "
                   f"longer than {self.config.peft.max_seq_length} tokens: their prompts were truncated from the left")
        if self.train_data.n_dropped:
            message += f"; {self.train_data.n_dropped} had no answer token left and were skipped"
        if self.valid_data is not None:
            data["validation_truncated_pairs"] = self.valid_data.n_truncated
        level = "warning" if self.train_data.n_truncated or self.train_data.n_dropped else "info"
        self.ctx.event(message, level=level, data=data)

    def _batch_rows(self, data: TokenizedPairs, indices: list[int]) -> list[PairRow]:
        """Whole pairs per forward pass; each row knows its pairs' indices in `data`."""
        return pair_rows([data.examples[i] for i in indices], indices, packing=bool(self.config.peft.packing),
                         row_token_cap=self.row_token_cap, pad_id=self.pad_id)

    # ---- log-probabilities ---------------------------------------------------------------------

    def _sequence_logps(self, pair_row: PairRow, *, base_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(pairs, 2) summed log-probabilities of each pair's chosen and rejected answer, and their token counts."""
        token_logps, labelled = self._labelled_token_logps(pair_row.row, base_only=base_only)
        sequence = pair_row.sequence_index().to(token_logps.device)[labelled]
        n_sequences = 2 * len(pair_row.pair_ids)
        sums = torch.zeros(n_sequences, device=token_logps.device, dtype=token_logps.dtype)
        tokens = torch.bincount(sequence, minlength=n_sequences)
        return sums.index_add(0, sequence, token_logps).view(-1, 2), tokens.view(-1, 2)

    @torch.no_grad()
    def _reference_logps(self, data: TokenizedPairs, *, through_adapter: bool) -> torch.Tensor:
        """The reference's (pairs, 2) log-probabilities, in eval mode (dropout off), on the CPU."""
        out = torch.zeros(len(data.examples), 2)
        with evaluation_mode(self.loaded.model):
            for rows in self._batched_rows(data):
                for pair_row in rows:
                    self._raise_if_stopped()
                    if through_adapter:
                        logps, _ = self._sequence_logps(pair_row)
                    else:
                        with self.method.adapter_disabled():
                            logps, _ = self._sequence_logps(pair_row, base_only=True)
                    out[pair_row.pair_ids] = logps.float().cpu()
        return out

    # ---- training --------------------------------------------------------------------------------

    def _accumulate_gradients(self, indices: list[int]) -> tuple[float, int]:
        """Backpropagate the mean DPO loss of these pairs; returns (loss, real tokens)."""
        totals = _Totals()
        n_tokens = 0
        reference = self.reference["train"]
        for pair_row in self._batch_rows(self.train_data, indices):
            self._raise_if_stopped()
            policy, tokens = self._sequence_logps(pair_row)
            stats = dpo_statistics(policy, reference[pair_row.pair_ids].to(policy.device), self.config.beta)
            (stats["loss"].sum() / len(indices)).backward()
            totals.add(stats, policy, tokens)
            n_tokens += pair_row.row.n_real_tokens
        self.step_stats = totals.means("")
        return self.step_stats["loss"], n_tokens

    @torch.no_grad()
    def evaluate(self) -> float:
        """The validation pairs' mean DPO loss (their rewards, margin and accuracy go to `valid_stats`)."""
        totals = _Totals()
        reference = self.reference["valid"]
        with evaluation_mode(self.loaded.model):
            for rows in self.valid_rows:
                for pair_row in rows:
                    self._raise_if_stopped()
                    policy, tokens = self._sequence_logps(pair_row)
                    totals.add(dpo_statistics(policy, reference[pair_row.pair_ids].to(policy.device),
                                              self.config.beta), policy, tokens)
        self.valid_stats = totals.means("valid_")
        return self.valid_stats["valid_loss"]

    def _metrics(self, train_loss, valid_loss, learning_rate, clock) -> dict:
        metrics = super()._metrics(train_loss, valid_loss, learning_rate, clock)
        metrics["dpo_loss"] = train_loss
        metrics.update({k: v for k, v in self.step_stats.items() if k != "loss"})
        if valid_loss is not None:
            metrics.update(self.valid_stats)
        return metrics

    # ---- checkpoints -----------------------------------------------------------------------------

    def _save_extra_state(self, folder: Path) -> None:
        save_file({split: logps.contiguous() for split, logps in self.reference.items()}, Path(folder) / REFERENCE_FILE)

    def _load_extra_state(self, folder: Path) -> None:
        path = Path(folder) / REFERENCE_FILE
        if not path.is_file():
            raise ValueError("the checkpoint holds no DPO reference log-probabilities")
        self.reference = dict(load_file(path))
