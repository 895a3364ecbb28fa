"""The fine-tuning recipe: one class with a fixed lifecycle, and `run_training` to drive it.

Lifecycle: `setup()` -> `train()` (which calls `save_checkpoint()` on schedule) -> `cleanup()`.
"""

from __future__ import annotations

import gc
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import get_scheduler, set_seed

from core.datasets import Example
from core.schemas.peft_methods import PROMPT_LEARNING
from worker.base_loading import load_tokenizer
from worker.device import choose_device
from worker.training.activation_memory import choose_checkpointing
from worker.training.artifacts import probe_record
from worker.training.checkpoint import load_training_checkpoint, save_training_checkpoint
from worker.training.chunked_loss import DEFAULT_CHUNK_TOKENS, chunked_token_logps
from worker.training.data import (
    IGNORE_INDEX,
    Row,
    TokenizedDataset,
    build_rows,
    step_batches,
    tokenize_dataset,
)
from worker.training.interface import JobContext, TrainingJob, TrainingStopped, TrainResult
from worker.training.model import (
    NO_GRADIENT_CHECKPOINTING,
    LoadedModel,
    enable_activation_checkpointing,
    evaluation_mode,
    gradient_checkpointing_applies,
    load_model_for_training,
    quantization_report,
)
from worker.training.packed_attention import SEGMENT_LENGTHS_KWARG, use_packed_attention
from worker.training.techniques import Techniques

ROW_TOKEN_BUDGET = 2048
"""Tokens per forward pass (a packed row or a padded micro-batch), unless max_seq_length is larger."""
MAX_GRAD_NORM = 1.0
"""Gradient clipping, as transformers' Trainer does by default."""
METRICS_INTERVAL_S = 2.0
"""Emit metrics at least this often (at step granularity), and on the first and last step."""
METRICS_POINTS = 20
"""Emit metrics at least every total_steps / METRICS_POINTS steps too, so a quick job still draws a curve."""


@dataclass
class _Progress:
    """Counters that survive a resume (stored in the checkpoint)."""

    trained_tokens: int = 0
    first_train_loss: float | None = None
    train_loss: float | None = None
    valid_loss: float | None = None


@dataclass
class _RunClock:
    """Wall time and tokens of this process's run (not counting steps done before a resume)."""

    started: float = field(default_factory=time.monotonic)
    steps: int = 0
    tokens: int = 0
    last_metrics_at: float = -math.inf

    def tokens_per_second(self) -> float:
        """Real tokens per second of wall time since this run started."""
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def eta_seconds(self, remaining_steps: int) -> float | None:
        """Seconds left at this run's average pace; None before the first step."""
        if self.steps == 0:
            return None
        return (time.monotonic() - self.started) / self.steps * remaining_steps


class FineTuneRecipe:
    """Supervised fine-tuning of a causal LM with any `peft.method`, on chat, completion or text examples.

    The loss of an optimizer step is the mean cross-entropy over all its labelled tokens (across
    all its rows). Only labelled positions go through `lm_head`: the decoder body runs on every
    token, then the hidden states of the labelled positions are gathered and projected. Prompt-learning
    methods run the peft model's forward (it prepends the virtual tokens or the prefix cache) and keep
    the logits of the labelled positions only.
    """

    def __init__(self, job: TrainingJob, ctx: JobContext, *, row_token_cap: int | None = None,
                 loss_chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> None:
        self.job = job
        self.ctx = ctx
        self.config = job.config
        self.row_token_cap = row_token_cap or max(self.config.peft.max_seq_length, ROW_TOKEN_BUDGET)
        self.loss_chunk_tokens = loss_chunk_tokens
        """lm_head and the log-softmax run on this many labelled tokens at a time (None: all at once)."""
        self.step = 0
        self.resumed_from_step: int | None = None
        self.progress = _Progress()
        self.loaded: LoadedModel | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    # ---- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        """Pick the device, tokenize, load and quantize the model, attach the method, build the
        optimizer and LR schedule, and resume from the context's latest checkpoint if any."""
        spec = self.config.peft
        if spec.method in PROMPT_LEARNING and spec.packing:
            raise ValueError(f"method {spec.method} prepends virtual tokens to every example: packing must be off")
        set_seed(self.config.seed)
        self.device = choose_device()
        self.ctx.event(
            f"training on {self.device.device.type} with {self.device.dtype_name} compute",
            data={"device": str(self.device.device), "compute_dtype": self.device.dtype_name},
        )
        self.tokenizer = load_tokenizer(self.job.base_model_path)
        self.train_data = self._tokenize(self.job.training_examples)
        validation = self.job.validation_examples
        self.valid_data = self._tokenize(validation) if validation else None
        self._report_truncation()
        if not self.train_data.examples:
            raise ValueError("no training example has a token to learn from after truncation")
        self.valid_rows = self._validation_rows()

        n_examples = len(self.train_data.examples)
        self.steps_per_epoch = math.ceil(n_examples / self.config.batch_size)
        self.total_steps = self.steps_per_epoch * self.config.n_epochs
        if spec.max_steps is not None:
            self.total_steps = min(self.total_steps, spec.max_steps)

        self.techniques = Techniques(self.config, self.total_steps)
        self.loaded = load_model_for_training(
            self.job.base_model_path, self.config, self.device, total_steps=self.total_steps,
            tokenizer=self.tokenizer, techniques=self.techniques,
        )
        self.method = self.loaded.method
        if self.job.start_adapter_dir is not None:
            self.method.load_adapter_weights(self.job.start_adapter_dir)
            parent = self.config.start_adapter
            named = (f"{parent.fine_tuned_model or parent.name} ({parent.id})" if parent
                     else str(self.job.start_adapter_dir))
            self.ctx.event(f"starting from the weights of {named}",
                           data={"start_adapter": parent.id if parent else None})
        if spec.gradient_checkpointing is True and not gradient_checkpointing_applies(self.config):
            self.ctx.event(f"gradient checkpointing is off: method {spec.method} cannot use it", level="warning",
                           data={"gradient_checkpointing": False})
        causal_lm = self.loaded.causal_lm
        _require_plain_lm_head(causal_lm.config)
        if spec.packing:
            use_packed_attention(causal_lm)
        self.decoder = causal_lm.get_decoder()
        self.lm_head = causal_lm.get_output_embeddings()
        if spec.gradient_checkpointing == "auto" and spec.method not in NO_GRADIENT_CHECKPOINTING:
            self._choose_checkpointing(causal_lm)
        self.quantization = quantization_report(self.loaded.model)
        self.ctx.event(_describe_quantization(self.quantization), data=self.quantization)

        self._build_optimizer()
        self.scheduler = get_scheduler(
            spec.lr_scheduler,
            self.optimizer,
            num_warmup_steps=math.ceil(spec.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self._resume_if_checkpointed()

    def _choose_checkpointing(self, causal_lm: torch.nn.Module) -> None:
        """`gradient_checkpointing: "auto"`: measure the activations per token, decide for the largest row."""
        choice = choose_checkpointing(
            self.loaded.model, self.decoder, self.device.device, row_tokens=self.row_token_cap,
            vocab_size=self.lm_head.weight.shape[0], chunk_tokens=self.loss_chunk_tokens,
        )
        if choice.enabled:
            enable_activation_checkpointing(causal_lm)
        self.ctx.event(choice.message(), data=choice.data())

    def _build_optimizer(self) -> None:
        """AdamW over every trainable parameter, in groups when the techniques need them (layer-wise
        learning rates; no weight decay on sparsely masked weights). Sets `param_names`, `trainable`,
        `optimizer`."""
        groups, self.param_names = self.techniques.param_groups(self.method.named_trainable(), self.method.model)
        self.trainable = [p for group in groups for p in group["params"]]
        self.optimizer = torch.optim.AdamW(
            groups, lr=self.config.learning_rate, weight_decay=self.config.peft.weight_decay
        )

    def _tokenize(self, examples: list[Example]) -> TokenizedDataset:
        return tokenize_dataset(
            examples,
            self.tokenizer,
            max_seq_length=self.config.peft.max_seq_length,
            train_on_inputs=self.config.peft.train_on_inputs,
        )

    def _report_truncation(self) -> None:
        data = {
            "truncated": self.train_data.n_truncated,
            "dropped": self.train_data.n_dropped,
            "max_seq_length": self.config.peft.max_seq_length,
        }
        message = (
            f"{self.train_data.n_truncated} of {len(self.job.training_examples)} training examples "
            f"were longer than {self.config.peft.max_seq_length} tokens and were truncated"
        )
        if self.train_data.n_dropped:
            message += f"; {self.train_data.n_dropped} had nothing left to learn and were skipped"
        if self.valid_data is not None:
            data["validation_truncated"] = self.valid_data.n_truncated
            data["validation_dropped"] = self.valid_data.n_dropped
            message += f" ({self.valid_data.n_truncated} validation examples truncated)"
        level = "warning" if self.train_data.n_truncated or self.train_data.n_dropped else "info"
        self.ctx.event(message, level=level, data=data)

    def _validation_rows(self) -> list[list[Row]]:
        if self.valid_data is None or not self.valid_data.examples:
            return []
        return self._batched_rows(self.valid_data)

    def _batched_rows(self, data) -> list[list[Row]]:
        """The forward passes of each batch of `batch_size` consecutive examples of `data`, in order."""
        n, size = len(data.examples), self.config.batch_size
        return [self._batch_rows(data, list(range(start, min(start + size, n)))) for start in range(0, n, size)]

    def _batch_rows(self, data, indices: list[int]) -> list[Row]:
        """The forward passes of these examples of `data`."""
        return self._rows([data.examples[i] for i in indices])

    @property
    def pad_id(self) -> int:
        """The tokenizer's pad token, or its end-of-sequence token where it has none."""
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def _rows(self, examples) -> list[Row]:
        return build_rows(
            examples, packing=self.config.peft.packing, row_token_cap=self.row_token_cap, pad_id=self.pad_id
        )

    def _resume_if_checkpointed(self) -> None:
        latest = self.ctx.latest_checkpoint()
        if latest is None:
            return
        _, folder = latest
        step, progress = load_training_checkpoint(
            folder,
            method=self.method,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            param_names=self.param_names,
        )
        self.techniques.load_state(folder)
        self._load_extra_state(folder)
        self.step = step
        self.resumed_from_step = step
        self.progress = _Progress(**progress)
        self.ctx.event(f"resumed from checkpoint at step {step}", data={"resumed_from_step": step})

    # ---- training ----------------------------------------------------------------------------

    def train(self) -> TrainResult:
        """Run the remaining optimizer steps, evaluate, checkpoint, and save the final adapter."""
        spec = self.config.peft
        clock = _RunClock()
        self.loaded.model.train()
        evaluated_at = None
        while self.step < self.total_steps:
            self._raise_if_stopped()
            learning_rate = max(self.scheduler.get_last_lr())  # layer-wise decay: the top layer's rate
            train_loss, n_tokens = self._train_step()
            self.step += 1
            clock.steps += 1
            clock.tokens += n_tokens
            self.progress.trained_tokens += n_tokens
            self.progress.train_loss = train_loss
            if self.progress.first_train_loss is None:
                self.progress.first_train_loss = train_loss

            is_last = self.step == self.total_steps
            eval_due = bool(spec.eval_every_steps) and self.step % spec.eval_every_steps == 0
            valid_loss = None
            if self.valid_rows and (is_last or eval_due):
                valid_loss = self.evaluate()
                self.progress.valid_loss = valid_loss
                evaluated_at = self.step
            now = time.monotonic()
            metrics_due = (now - clock.last_metrics_at >= METRICS_INTERVAL_S
                           or self.step % max(1, self.total_steps // METRICS_POINTS) == 0)
            if clock.steps == 1 or is_last or valid_loss is not None or metrics_due:
                clock.last_metrics_at = now
                self.ctx.metrics(self._metrics(train_loss, valid_loss, learning_rate, clock))
            if not is_last and self.step % spec.checkpoint_every_steps == 0:
                self.save_checkpoint()

        if self.valid_rows and evaluated_at != self.step:  # resumed at the very end
            self.progress.valid_loss = self.evaluate()
        self.method.finalize()
        probe = probe_record(self.loaded.model, self.train_data.examples[0].input_ids)
        adapter_dir = Path(self.job.work_dir) / "adapter"
        self.method.save(adapter_dir)
        self.techniques.save(adapter_dir)
        _, total = self.loaded.param_counts()
        trainable = self.techniques.trainable_params(self.trainable)
        final = {
            "train_loss": self.progress.train_loss,
            "valid_loss": self.progress.valid_loss,
            "first_train_loss": self.progress.first_train_loss,
            "steps": self.step,
            "trained_tokens": self.progress.trained_tokens,
            "train_runtime_s": round(time.monotonic() - clock.started, 3),
            "tokens_per_second": clock.tokens_per_second(),
            "resumed_from_step": self.resumed_from_step,
            "truncated_examples": self.train_data.n_truncated,
        }
        self.ctx.event(
            f"training finished after {self.step} steps: train loss {_fmt(final['train_loss'])}, "
            f"validation loss {_fmt(final['valid_loss'])}",
            data=final,
        )
        return TrainResult(
            adapter_dir=adapter_dir,
            steps=self.step,
            trained_tokens=self.progress.trained_tokens,
            metrics=final,
            quantization=self.quantization,
            trainable_params=trainable,
            total_params=total,
            base_params=self.method.base_params,
            probe=probe,
        )

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step over this step's examples; returns (the step's loss, real tokens)."""
        epoch, index = divmod(self.step, self.steps_per_epoch)
        indices = self._epoch_batches(epoch)[index]
        self.techniques.begin_step(self.step)
        loss, n_tokens = self._accumulate_gradients(indices)
        regulariser = self.method.extra_loss()
        if regulariser is not None:
            regulariser.backward()
        torch.nn.utils.clip_grad_norm_(self.trainable, MAX_GRAD_NORM)
        self.optimizer.step()
        self.techniques.after_optimizer_step(self.optimizer, self.trainable)
        self.method.after_optimizer_step(self.step)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, n_tokens

    def _accumulate_gradients(self, indices: list[int]) -> tuple[float, int]:
        """Backpropagate the token-mean cross-entropy of these examples; returns (loss, real tokens)."""
        rows = self._batch_rows(self.train_data, indices)
        n_labelled = sum(row.n_labelled for row in rows)
        loss_sum = 0.0
        for row in rows:
            self._raise_if_stopped()
            row_loss = self._row_loss_sum(row)
            (row_loss / n_labelled).backward()
            loss_sum += row_loss.item()
        return loss_sum / n_labelled, sum(row.n_real_tokens for row in rows)

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_batches_epoch", None) != epoch:
            self._batches = step_batches(
                len(self.train_data.examples), self.config.batch_size, self.config.seed, epoch
            )
            self._batches_epoch = epoch
        return self._batches

    def _row_loss_sum(self, row: Row) -> torch.Tensor:
        """Summed cross-entropy of a row's labelled positions; lm_head runs only on those."""
        token_logps, _ = self._labelled_token_logps(row)
        return -token_logps.sum()

    def _labelled_token_logps(self, row: Row, *, base_only: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 log-probabilities of the row's labelled targets, in row-major order, and their (B, L) mask.

        lm_head and the log-softmax run in chunks of `loss_chunk_tokens` labelled tokens
        (`worker.training.chunked_loss`), so the [tokens, vocab] logits never exist at once.
        `base_only` skips the prompt-learning forward (the decoder alone is then the base model);
        other methods switch their adapter off with `method.adapter_disabled()`.
        """
        if self.method.prompt_learning and not base_only:
            logits, targets, labelled = self._prompt_labelled_logits(row)
            return -F.cross_entropy(logits.float(), targets, reduction="none"), labelled
        device = self.device.device
        kwargs = {}
        if row.segment_lengths is not None:
            kwargs[SEGMENT_LENGTHS_KWARG] = row.segment_lengths
        hidden = self.decoder(
            input_ids=row.input_ids.to(device),
            attention_mask=row.attention_mask.to(device) if row.attention_mask is not None else None,
            position_ids=row.position_ids.to(device) if row.position_ids is not None else None,
            use_cache=False,
            **kwargs,
        ).last_hidden_state
        targets = row.targets.to(device)
        labelled = targets != IGNORE_INDEX
        logps = chunked_token_logps(hidden[labelled], self.lm_head, targets[labelled],
                                    chunk_tokens=self.loss_chunk_tokens)
        return logps, labelled

    def _prompt_labelled_logits(self, row: Row) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The same through the peft model's forward, which adds the virtual tokens or prefix.

        lm_head runs on the columns where some example of the micro-batch has a label (shifted past
        the virtual tokens that prompt/P-tuning prepend to the sequence).
        """
        device = self.device.device
        targets = row.targets.to(device)
        columns = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        input_ids = row.input_ids.to(device)
        mask = row.attention_mask.to(device) if row.attention_mask is not None else torch.ones_like(input_ids)
        logits = self.loaded.model(
            input_ids=input_ids, attention_mask=mask, logits_to_keep=columns + self.method.virtual_tokens_in_logits
        ).logits
        kept_targets = targets[:, columns]
        labelled = kept_targets != IGNORE_INDEX
        full_mask = torch.zeros_like(targets, dtype=torch.bool)
        full_mask[:, columns] = labelled
        return logits[labelled], kept_targets[labelled], full_mask

    @torch.no_grad()
    def evaluate(self) -> float:
        """Validation loss: the token-mean cross-entropy over every labelled validation token."""
        loss_sum, n_labelled = 0.0, 0
        with evaluation_mode(self.loaded.model):
            for rows in self.valid_rows:
                for row in rows:
                    self._raise_if_stopped()
                    loss_sum += self._row_loss_sum(row).item()
                    n_labelled += row.n_labelled
        return loss_sum / max(n_labelled, 1)

    def _metrics(
        self, train_loss: float, valid_loss: float | None, learning_rate: float, clock: _RunClock
    ) -> dict:
        return {
            "step": self.step,
            "total_steps": self.total_steps,
            "train_loss": train_loss,
            "valid_loss": valid_loss,
            "learning_rate": learning_rate,
            "tokens_per_second": clock.tokens_per_second(),
            "eta_seconds": clock.eta_seconds(self.total_steps - self.step),
            "epoch": self.step / self.steps_per_epoch,
        }

    def _raise_if_stopped(self) -> None:
        if self.ctx.should_stop():
            raise TrainingStopped(f"job {self.job.job_id} was asked to stop at step {self.step}")

    # ---- checkpoints and cleanup -------------------------------------------------------------

    def save_checkpoint(self) -> None:
        """Write a checkpoint of the current step, hand it to the context, then delete the local copy."""
        folder = Path(self.job.work_dir) / "checkpoints" / f"step-{self.step:06d}"
        save_training_checkpoint(
            folder,
            method=self.method,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            param_names=self.param_names,
            step=self.step,
            progress=vars(self.progress).copy(),
        )
        metrics = {
            "step": self.step,
            "train_loss": self.progress.train_loss,
            "valid_loss": self.progress.valid_loss,
        }
        try:
            self.techniques.save_state(folder)
            self._save_extra_state(folder)
            self.ctx.save_checkpoint(self.step, folder, metrics)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _save_extra_state(self, folder: Path) -> None:
        """What a recipe variant adds to a checkpoint (nothing here)."""

    def _load_extra_state(self, folder: Path) -> None:
        """Restore what `_save_extra_state` wrote."""

    def cleanup(self) -> None:
        """Free the model, optimizer and data, collect garbage and empty the CUDA cache. Idempotent."""
        if getattr(self, "techniques", None) is not None:
            self.techniques.remove()
        for name in ("loaded", "method", "optimizer", "scheduler", "decoder", "lm_head", "trainable", "valid_rows"):
            if hasattr(self, name):
                setattr(self, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _require_plain_lm_head(config) -> None:
    """Refuse models whose logits need more than `lm_head(hidden)` (we call lm_head directly)."""
    for attribute in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise ValueError(f"models with {attribute} are not supported by this recipe yet")


def _describe_quantization(report: dict) -> str:
    if not report["linear4bit"]:
        return (
            f"base model kept in {report['compute_dtype']}: "
            f"{report['decoder_linears']} decoder linears unquantized"
        )
    nested = "with double quantization" if report["all_nested"] else "without double quantization"
    return (
        f"base model quantized to {report['quant_type']} {nested}: {report['linear4bit']} of "
        f"{report['decoder_linears']} decoder linears are 4-bit, "
        f"{report['bits_per_param']} bits per parameter"
    )


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def run_training(job: TrainingJob, ctx: JobContext) -> TrainResult:
    """Set up, train and clean up one job (supervised or DPO); raises TrainingStopped if the context asks to stop."""
    if job.config.method == "dpo":
        from worker.training.dpo_recipe import DpoRecipe

        recipe: FineTuneRecipe = DpoRecipe(job, ctx)
    else:
        recipe = FineTuneRecipe(job, ctx)
    try:
        recipe.setup()
        return recipe.train()
    finally:
        recipe.cleanup()
