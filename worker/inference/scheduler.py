"""Continuous batching: one background loop that admits, prefills and decodes requests of any adapters together.

Each iteration drops cancelled requests, admits waiting ones up to `max_batch_size` (they are
prefilled together, whatever their adapters, and their first token sampled; then they join the
running batch), and runs ONE decode forward for every running sequence, whatever its adapter, with
a per-row adapter slot. A request that arrives while others run joins at the next iteration; it never
waits for the batch to finish.

Prompt-learning adapters only change the prefill: virtual tokens are prepended to the row's prompt
embeddings (such rows prefill with any others), and prefix-tuning rows are prefilled per adapter on
a cache that starts with the prefix keys/values (prompt positions then start after the prefix, as in
peft). Either way the sequence's context length counts those positions, so decoding needs nothing.

A prompt longer than `prefill_chunk_tokens` is prefilled a chunk per iteration instead, between the
running batch's decode steps (`worker.inference.chunked_prefill`), so it never stalls them for long.

A plain prompt (no virtual tokens, no prefix) that opens with a prefix already prefilled for the same
adapter starts from those stored keys and values (`worker.inference.prefix_cache`): only the rest is
prefilled, together with the rows that start from the same stored prefix.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import DynamicCache

from worker.inference.adapter_slots import AdapterSlots
from worker.inference.chunked_prefill import DEFAULT_CHUNK_TOKENS, ChunkedPrefill
from worker.inference.generation import ErrorEvent, FinishEvent, GenerationHandle, GenerationRequest, TokenEvent
from worker.inference.kv_batch import PaddedKVBatch
from worker.inference.metrics import SequenceMetrics, ServingMetrics
from worker.inference.prefix_cache import PrefixCache, PrefixHit
from worker.inference.sampling import choose_token, make_generator, token_logprob
from worker.inference.text_stream import TextStream

logger = logging.getLogger(__name__)


@dataclass
class ActiveSequence:
    """A submitted request and its generation state."""

    request: GenerationRequest
    handle: GenerationHandle
    slot: int | None  # the adapter's slot, None for the base
    text: TextStream
    on_finish: Callable[[], None]  # releases the adapter hold
    metrics: SequenceMetrics | None = None  # its time to first token, inter-token latency and token count
    generator: torch.Generator = field(init=False)
    context_len: int = 0  # tokens in this sequence's KV cache
    cached_prefix: PrefixHit | None = None  # the stored prompt prefix its prefill starts from
    next_token: int | None = None  # sampled, not yet fed to the model
    completion_tokens: int = 0
    finished: bool = False

    def __post_init__(self) -> None:
        self.generator = make_generator(self.request.seed)

    @property
    def adapter(self) -> str | None:
        """The adapter name (None for the base)."""
        return self.request.adapter


class BatchScheduler:
    """Runs the generation loop on one background thread."""

    def __init__(
        self,
        model: nn.Module,
        bank: AdapterSlots,
        decode: Callable[[list[int]], str],
        eos_token_ids: set[int],
        max_batch_size: int,
        device: torch.device,
        max_prefill_tokens: int = 4096,
        metrics: ServingMetrics | None = None,
        prefill_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        prefix_cache: PrefixCache | None = None,
    ) -> None:
        self._model = model
        self._prefix_cache = prefix_cache if prefix_cache is not None and prefix_cache.enabled else None
        self._metrics = metrics
        self._decoder = model.get_decoder()
        self._lm_head = model.get_output_embeddings()
        self.max_prefill_tokens = max_prefill_tokens
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._chunked: collections.deque[tuple[ActiveSequence, ChunkedPrefill]] = collections.deque()
        self._bank = bank
        self._decode = decode
        self._eos = frozenset(eos_token_ids)
        self.max_batch_size = max_batch_size
        self._device = device
        self._kv = PaddedKVBatch(model.config)
        self._running: list[ActiveSequence] = []
        self._waiting: collections.deque[ActiveSequence] = collections.deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._stats = {
            "decode_steps": 0,
            "mixed_adapter_steps": 0,
            "max_batch_size": 0,
            "max_distinct_adapters": 0,
            "prefills": 0,
            "prefill_chunks": 0,
            "max_prefill_batch": 0,
            "joined_running_batch": 0,
            "generated_tokens": 0,
        }
        self._stats_lock = threading.Lock()

    def new_text_stream(self, stop: list[str]) -> TextStream:
        """A detokenizer for one request."""
        return TextStream(self._decode, stop)

    def start(self) -> None:
        """Start the loop thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="inference-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; requests still waiting or running end with an `ErrorEvent`."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, sequence: ActiveSequence) -> None:
        """Queue a sequence; it is admitted at the next iteration with room in the batch."""
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the inference engine is stopped")
            self._waiting.append(sequence)
            self._wakeup.notify_all()
        sequence.handle.on_cancel.append(self._wake)

    def stats(self) -> dict:
        """Counters: decode steps, how many mixed more than one adapter, the largest batch and adapter mix."""
        with self._stats_lock:
            stats = dict(self._stats)
        with self._wakeup:
            stats["waiting"] = len(self._waiting)
        stats["running"] = len(self._running)
        if self._prefix_cache is not None:
            cached = self._prefix_cache.stats()
            stats["prefix_cache_hits"], stats["prefix_cache_hit_tokens"] = cached["hits"], cached["hit_tokens"]
        return stats

    def _wake(self) -> None:
        with self._wakeup:
            self._wakeup.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wakeup:
                    while not self._stopping and not self._waiting and not self._running and not self._chunked:
                        self._wakeup.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as exc:  # keep serving: fail the batch, not the loop
                    logger.exception("decode step failed")
                    for sequence in self._running + [s for s, _ in self._chunked]:
                        self._fail(sequence, f"generation failed: {exc}")
                    self._running = []
                    self._chunked.clear()
                    self._kv.clear()
            with self._wakeup:
                leftovers = list(self._waiting) + self._running + [s for s, _ in self._chunked]
                self._waiting.clear()
                self._chunked.clear()
            for sequence in leftovers:
                self._fail(sequence, "the inference engine stopped")
            self._running = []
            self._kv.clear()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._advance_chunked()
        if self._running:
            self._decode_step()

    def _drop_cancelled(self) -> None:
        keep = [i for i, s in enumerate(self._running) if not s.handle.cancelled]
        if len(keep) == len(self._running):
            return
        for sequence in self._running:
            if sequence.handle.cancelled:
                self._fail(sequence, "the request was cancelled")
        self._running = [self._running[i] for i in keep]
        self._kv.keep(keep)

    def _admit(self) -> None:
        room = self.max_batch_size - len(self._running) - len(self._chunked)
        admitted: list[ActiveSequence] = []
        with self._wakeup:
            while room > len(admitted) and self._waiting:
                admitted.append(self._waiting.popleft())
        joined_running = bool(self._running)
        for sequence in admitted:
            if sequence.handle.cancelled:
                self._fail(sequence, "the request was cancelled")
        admitted = [s for s in admitted if not s.finished]
        for sequence in admitted:
            self._look_up_prefix(sequence)
        for sequence in [s for s in admitted if self._chunkable(s)]:
            self._chunked.append((sequence, self._chunked_prefill(sequence)))
        admitted = [s for s in admitted if not self._chunkable(s)]
        for group in self._prefill_groups(admitted):
            try:
                cache, lengths = self._prefill(group)
            except Exception as exc:
                logger.exception("prefill failed")
                for sequence in group:
                    self._fail(sequence, f"prefill failed: {exc}")
                continue
            rows = [i for i, s in enumerate(group) if not s.finished]
            self._running.extend(group[i] for i in rows)  # first: if append fails, the loop fails them too
            self._kv.append(cache, lengths, rows)
            if joined_running:
                self._count("joined_running_batch", len(rows))

    def _plain_prompt(self, sequence: ActiveSequence) -> bool:
        """Whether the sequence's cache holds its prompt alone (its adapter adds no virtual tokens or prefix)."""
        prompts = self._bank.prompts
        return prompts.virtual_tokens(sequence.slot) is None and prompts.prefix(sequence.slot) is None

    def _chunkable(self, sequence: ActiveSequence) -> bool:
        """A plain prompt whose part still to prefill is longer than one prefill chunk."""
        return self._fed_length(sequence) > self.prefill_chunk_tokens and self._plain_prompt(sequence)

    def _chunked_prefill(self, sequence: ActiveSequence) -> ChunkedPrefill:
        cache, hit = self._kv.new_prefill_cache(), sequence.cached_prefix
        if hit is not None:
            hit.seed(cache, 1)
        return ChunkedPrefill(sequence.request.prompt_ids, cache, done=0 if hit is None else hit.length)

    def _look_up_prefix(self, sequence: ActiveSequence) -> None:
        if self._prefix_cache is not None and self._plain_prompt(sequence):
            owner = self._bank.owner(sequence.slot)
            sequence.cached_prefix = self._prefix_cache.lookup(owner, sequence.request.prompt_ids)

    def _store_prefix(self, sequence: ActiveSequence, cache: DynamicCache, row: int) -> None:
        """Keep the prompt's keys and values (row `row` of its prefill cache) for later prompts.

        Best effort: a copy that fails (out of memory) costs later prompts a longer prefill, not this request."""
        if self._prefix_cache is None or not self._plain_prompt(sequence):
            return
        try:
            self._prefix_cache.store(self._bank.owner(sequence.slot), sequence.request.prompt_ids, cache, row)
        except RuntimeError:
            logger.exception("storing a prompt prefix failed")

    def _advance_chunked(self) -> None:
        """Feed the next chunk of the oldest long prompt (while others decode), or all of them (while none do)."""
        while self._chunked:
            sequence, prefill = self._chunked[0]
            if sequence.handle.cancelled:
                self._chunked.popleft()
                self._fail(sequence, "the request was cancelled")
                continue
            try:
                with self._bank.route([sequence.slot]):
                    hidden = prefill.feed(self._decoder, self.prefill_chunk_tokens, self._device)
                if prefill.finished:
                    logits = self._lm_head(hidden).float().cpu()
            except Exception as exc:
                logger.exception("chunked prefill failed")
                self._chunked.popleft()
                self._fail(sequence, f"prefill failed: {exc}")
                continue
            self._count("prefill_chunks")
            if prefill.finished:
                self._chunked.popleft()
                self._count("prefills")
                sequence.context_len = len(prefill.prompt_ids)
                joined_running = bool(self._running)
                self._accept(sequence, logits)
                self._store_prefix(sequence, prefill.cache, 0)
                if not sequence.finished:
                    self._running.append(sequence)
                    self._kv.append(prefill.cache, [sequence.context_len], [0])
                    if joined_running:
                        self._count("joined_running_batch")
            if self._running:
                return

    def _prefill_groups(self, sequences: list[ActiveSequence]) -> list[list[ActiveSequence]]:
        """Prefix-tuning rows per adapter, rows that start from a stored prefix per prefix, all others together;
        split so that each padded prefill stays within `max_prefill_tokens`."""
        prompts = self._bank.prompts
        by_prefix: dict[tuple | None, list[ActiveSequence]] = {}
        for sequence in sequences:
            key = None
            if prompts.prefix(sequence.slot) is not None:
                key = ("prefix tuning", sequence.slot)
            elif sequence.cached_prefix is not None:
                key = ("stored prefix", sequence.cached_prefix.group_key)
            by_prefix.setdefault(key, []).append(sequence)
        groups: list[list[ActiveSequence]] = []
        for members in by_prefix.values():
            start = len(groups)
            for sequence in sorted(members, key=self._fed_length):
                width = self._fed_length(sequence)  # the longest so far, as they are sorted
                if len(groups) > start and (len(groups[-1]) + 1) * width <= self.max_prefill_tokens:
                    groups[-1].append(sequence)
                else:
                    groups.append([sequence])
        return groups

    def _fed_length(self, sequence: ActiveSequence) -> int:
        """Positions the prefill forward computes for the sequence: virtual tokens (if any) + uncached prompt."""
        virtual = self._bank.prompts.virtual_tokens(sequence.slot)
        return len(self._uncached_prompt(sequence)) + (0 if virtual is None else virtual.shape[0])

    @staticmethod
    def _uncached_prompt(sequence: ActiveSequence) -> list[int]:
        """The prompt's ids after its stored prefix (all of them without one)."""
        hit = sequence.cached_prefix
        return sequence.request.prompt_ids if hit is None else sequence.request.prompt_ids[hit.length :]

    def _prefill(self, group: list[ActiveSequence]) -> tuple[DynamicCache, list[int]]:
        """One right-padded forward over the prompts; sample each first token. Returns (cache, lengths)."""
        prompts = self._bank.prompts
        fed = [self._fed_length(s) for s in group]
        cache = self._kv.new_prefill_cache()
        prefix_length, hit = 0, group[0].cached_prefix
        if prompts.prefix(group[0].slot) is not None:  # a prefix group: every row has the same prefix adapter
            prefix_length = prompts.count(group[0].slot)
            prompts.seed_cache(cache, group[0].slot, len(group))
        elif hit is not None:  # every row starts from the same stored prefix
            prefix_length = hit.length
            hit.seed(cache, len(group))
        with self._bank.route([s.slot for s in group]):
            hidden = self._decoder(**self._prefill_inputs(group, max(fed)), cache=cache, use_cache=True)
        hidden = hidden.last_hidden_state
        last = hidden[torch.arange(len(group), device=hidden.device), torch.tensor(fed, device=hidden.device) - 1]
        logits = self._lm_head(last).float().cpu()
        with self._stats_lock:
            self._stats["prefills"] += len(group)
            self._stats["max_prefill_batch"] = max(self._stats["max_prefill_batch"], len(group))
        lengths = [prefix_length + n for n in fed]
        for sequence, length, row in zip(group, lengths, logits):
            sequence.context_len = length
            self._accept(sequence, row)
        for row, sequence in enumerate(group):  # after the first tokens are out: this is off their critical path
            self._store_prefix(sequence, cache, row)
        return cache, lengths

    def _prefill_inputs(self, group: list[ActiveSequence], width: int) -> dict[str, torch.Tensor]:
        """Right-padded `input_ids`, or `inputs_embeds` with each row's virtual tokens before its prompt."""
        prompts = [self._uncached_prompt(s) for s in group]
        virtual = [self._bank.prompts.virtual_tokens(s.slot) for s in group]
        if all(v is None for v in virtual):
            ids = [p + [0] * (width - len(p)) for p in prompts]
            return {"input_ids": torch.tensor(ids, dtype=torch.long, device=self._device)}
        embed = self._model.get_input_embeddings()
        rows = []
        for prompt, tokens in zip(prompts, virtual):
            row = embed(torch.tensor(prompt, dtype=torch.long, device=self._device))
            if tokens is not None:
                row = torch.cat([tokens.to(row.dtype), row])
            rows.append(torch.nn.functional.pad(row, (0, 0, 0, width - row.shape[0])))
        return {"inputs_embeds": torch.stack(rows)}

    def _decode_step(self) -> None:
        rows = self._running
        input_ids = torch.tensor([[s.next_token] for s in rows], dtype=torch.long, device=self._device)
        position_ids = torch.tensor([[s.context_len] for s in rows], dtype=torch.long, device=self._device)
        step_mask = self._kv.mask_with_new_column()
        self._record_batch(rows)
        with self._bank.route([s.slot for s in rows]):
            output = self._model(
                input_ids=input_ids,
                attention_mask=step_mask,
                position_ids=position_ids,
                cache=self._kv.cache,
                use_cache=True,
            )
        self._kv.commit_step(step_mask)
        logits = output.logits[:, -1].float().cpu()
        for i, sequence in enumerate(rows):
            sequence.context_len += 1
            self._accept(sequence, logits[i])
        keep = [i for i, s in enumerate(rows) if not s.finished]
        if len(keep) < len(rows):
            self._running = [rows[i] for i in keep]
            self._kv.keep(keep)

    def _record_batch(self, rows: list[ActiveSequence]) -> None:
        mix = collections.Counter(s.adapter for s in rows)
        if self._metrics is not None:
            self._metrics.batch(len(rows))
        with self._stats_lock:
            stats = self._stats
            stats["decode_steps"] += 1
            stats["mixed_adapter_steps"] += len(mix) > 1
            stats["max_batch_size"] = max(stats["max_batch_size"], len(rows))
            stats["max_distinct_adapters"] = max(stats["max_distinct_adapters"], len(mix))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("decode batch of %d: %s", len(rows), dict(mix))

    def _count(self, name: str, amount: int = 1) -> None:
        with self._stats_lock:
            self._stats[name] += amount

    def _accept(self, sequence: ActiveSequence, logits: torch.Tensor) -> None:
        """Sample the next token of `sequence` from its logits row and emit the resulting events."""
        request = sequence.request
        token = choose_token(logits, request.temperature, request.top_p, sequence.generator)
        sequence.completion_tokens += 1
        self._count("generated_tokens")
        if sequence.metrics is not None:
            sequence.metrics.token()
        logprob = token_logprob(logits, token) if request.logprobs else None
        if token in self._eos:
            tail = sequence.text.finish()
            if tail:  # text held back until now is released by the end of the sequence
                sequence.handle.push(TokenEvent(token_id=token, text=tail, logprob=logprob))
            self._finish(sequence, "stop")
            return
        text = sequence.text.push(token)
        at_length = sequence.completion_tokens >= request.max_new_tokens
        if at_length and not sequence.text.stopped:
            text += sequence.text.finish()
        sequence.handle.push(TokenEvent(token_id=token, text=text, logprob=logprob))
        if sequence.text.stopped:
            self._finish(sequence, "stop")
        elif at_length:
            self._finish(sequence, "length")
        else:
            sequence.next_token = token

    def _finish(self, sequence: ActiveSequence, reason: str) -> None:
        sequence.finished = True
        sequence.handle.push(
            FinishEvent(
                finish_reason=reason,
                prompt_tokens=len(sequence.request.prompt_ids),
                completion_tokens=sequence.completion_tokens,
            )
        )
        sequence.on_finish()

    def _fail(self, sequence: ActiveSequence, message: str) -> None:
        if sequence.finished:
            return
        sequence.finished = True
        sequence.handle.push(ErrorEvent(message))
        sequence.on_finish()
