"""The inference engine: one shared base model serving many adapters of any kind with continuous batching."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from worker.base_loading import load_base_model, load_tokenizer
from worker.device import choose_device
from worker.inference.adapter_slots import install_adapter_slots
from worker.inference.adapters import AdapterManager
from worker.inference.chunked_prefill import DEFAULT_CHUNK_TOKENS
from worker.inference.cpu_threads import on_short_lived_thread
from worker.inference.fast_linear import LinearKernels, use_onednn_linears
from worker.inference.generation import (
    ErrorEvent,
    FinishEvent,
    GenerationHandle,
    GenerationRequest,
    GenerationResult,
    TokenEvent,
)
from worker.inference.metrics import ServingMetrics
from worker.inference.prefix_cache import PrefixCache
from worker.inference.scheduler import ActiveSequence, BatchScheduler

__all__ = [
    "ErrorEvent",
    "FinishEvent",
    "GenerationHandle",
    "GenerationRequest",
    "GenerationResult",
    "InferenceEngine",
    "TokenEvent",
]

logger = logging.getLogger(__name__)

END_OF_TURN_TOKENS = ("<|im_end|>",)
DEFAULT_PREFIX_CACHE_BYTES = 256 * 2**20
SERVING_QUANTIZATIONS = ("nf4-dq", "none")
"""The base's storage when serving: 4-bit NF4 with double quantization, or full precision."""


class InferenceEngine:
    """Loads a base model once and generates for many adapters at once on a background thread.

    Adapters of any served kind (see `worker.formats.served`) are loaded into slots through `engine.adapters`
    (an `AdapterManager`) and picked per request by name. Use as a context manager, or call `close()`
    to stop the loop thread. `metrics` labels its Prometheus series (default: by the model folder's name).
    `onednn_linears`: on CPU, let the plain linears take oneDNN for the row counts where it measured faster at
    start (see `worker.inference.fast_linear`).
    `prefill_chunk_tokens`: longer prompts prefill a chunk per decode step (`worker.inference.chunked_prefill`).
    `prefix_cache_bytes`: memory for the keys and values of prompt prefixes already prefilled, which prompts that
    open the same way reuse (`worker.inference.prefix_cache`); 0 turns it off.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        quantization: str,
        max_loaded_adapters: int,
        max_lora_rank: int = 64,
        max_batch_size: int = 16,
        device: torch.device | str | None = None,
        metrics: ServingMetrics | None = None,
        onednn_linears: bool = True,
        prefill_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        prefix_cache_bytes: int = DEFAULT_PREFIX_CACHE_BYTES,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        if quantization not in SERVING_QUANTIZATIONS:
            raise ValueError(f"unknown quantization {quantization!r}; choose one of {SERVING_QUANTIZATIONS}")
        choice = choose_device(device)
        self.max_batch_size = max_batch_size
        self.metrics = metrics or ServingMetrics(Path(model_dir).name)
        self.device, self.dtype = choice.device, choice.compute_dtype
        self.tokenizer = load_tokenizer(model_dir)
        self.quantization = quantization

        self.linear_kernels = LinearKernels()
        """Which kernel the plain CPU linears take, by row count (`worker.inference.fast_linear`)."""

        def load() -> None:
            self.model = load_base_model(model_dir, quantization, choice, training=False)
            self.slots = install_adapter_slots(self.model, max_loaded_adapters, max_lora_rank, self.dtype, quantization)
            if onednn_linears and self.device.type == "cpu" and use_onednn_linears(self.model, self.linear_kernels):
                self.linear_kernels.calibrate(self._calibration_forward)

        on_short_lived_thread(load, "base-model-load")  # see worker.inference.cpu_threads
        self.adapters = AdapterManager(self.slots, max_loaded_adapters, metrics=self.metrics)
        self.eos_token_ids = self._eos_token_ids()
        self._vocab_size = self.model.get_input_embeddings().weight.shape[0]
        self._max_positions = getattr(self.model.config, "max_position_embeddings", None)
        self._scheduler = BatchScheduler(
            self.model, self.slots, self.decode, self.eos_token_ids, max_batch_size, self.device, metrics=self.metrics,
            prefill_chunk_tokens=prefill_chunk_tokens, prefix_cache=PrefixCache(prefix_cache_bytes),
        )
        self._scheduler.start()

    def _calibration_forward(self, rows: int) -> None:
        """One base-model forward over `rows` positions of one sequence (what `LinearKernels` times)."""
        positions = getattr(self.model.config, "max_position_embeddings", None) or rows
        input_ids = torch.zeros((1, min(rows, positions)), dtype=torch.long, device=self.device)
        with torch.inference_mode():
            self.model.get_decoder()(input_ids=input_ids, use_cache=False)

    def _eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        vocab = self.tokenizer.get_vocab()
        ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        if configured is not None:
            ids.update([configured] if isinstance(configured, int) else configured)
        return ids

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Prompt ids of a chat through the tokenizer's chat template, opening the assistant's turn."""
        if not self.tokenizer.chat_template:
            raise ValueError("this model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode_text(self, text: str) -> list[int]:
        """Prompt ids of raw text (with the tokenizer's usual special tokens, if it adds any)."""
        return list(self.tokenizer(text)["input_ids"])

    def max_context(self, adapter: str | None = None) -> int:
        """The most tokens (prompt + completion) one sequence may hold; an adapter's virtual tokens take their share."""
        positions = self._max_positions if self._max_positions is not None else self.tokenizer.model_max_length
        status = self.adapters.status(adapter) if adapter is not None else None
        virtual = self.slots.prompts.count(status.slot) if status is not None and status.slot is not None else 0
        return int(positions) - virtual

    def decode(self, token_ids: list[int]) -> str:
        """The text of generated ids (special tokens skipped; what the token deltas add up to)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request and return its event stream; it joins the running batch at the next step.

        Raises `ValueError` for an invalid request and `AdapterNotReadyError` when its adapter is not
        ready. The request holds its adapter (no eviction) until it finishes.
        """
        self._validate(request)
        slot = self.adapters.acquire(request.adapter) if request.adapter is not None else None
        try:
            self._check_context(request, self.slots.prompts.count(slot))
        except ValueError:
            self._releaser(request.adapter)()
            raise
        handle = GenerationHandle(request)
        sequence = ActiveSequence(
            request=request,
            handle=handle,
            slot=slot,
            text=self._scheduler.new_text_stream(request.stop),
            on_finish=self._releaser(request.adapter),
            metrics=self.metrics.sequence(request.adapter),
        )
        try:
            self._scheduler.submit(sequence)
        except Exception:
            sequence.on_finish()
            raise
        return handle

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Submit and wait for the whole result (raises `GenerationError` if it fails)."""
        return self.submit(request).result()

    def stats(self) -> dict:
        """Scheduler counters (decode steps, mixed-adapter steps, batch sizes) for monitoring."""
        return self._scheduler.stats()

    def close(self) -> None:
        """Stop the scheduler thread; unfinished requests end with an `ErrorEvent`."""
        self._scheduler.stop()

    def __enter__(self) -> InferenceEngine:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _releaser(self, adapter: str | None):
        released = False

        def release() -> None:
            nonlocal released
            if adapter is not None and not released:
                released = True
                self.adapters.release(adapter)

        return release

    def _validate(self, request: GenerationRequest) -> None:
        ids = request.prompt_ids
        if not ids:
            raise ValueError("prompt_ids must not be empty")
        if any(not isinstance(i, int) or not 0 <= i < self._vocab_size for i in ids):
            raise ValueError(f"prompt_ids must be token ids in [0, {self._vocab_size})")
        if request.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if request.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < request.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")

    def _check_context(self, request: GenerationRequest, virtual_tokens: int) -> None:
        context = self.max_context() - virtual_tokens
        if len(request.prompt_ids) + request.max_new_tokens > context:
            adapter = f" (after the adapter's {virtual_tokens} virtual tokens)" if virtual_tokens else ""
            raise ValueError(
                f"prompt ({len(request.prompt_ids)} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds the "
                f"model's context of {context} tokens{adapter}"
            )
