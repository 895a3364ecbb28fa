"""Turn generated token ids into text deltas, cutting at stop strings.

The deltas always concatenate to `decode(all ids)` (cut before the first stop string). A delta is
held back while the text ends in an incomplete UTF-8 character (U+FFFD from a partial byte
sequence) or in what could be the start of a stop string; `finish()` releases what is left.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT_CHAR = "\ufffd"


class TextStream:
    """Incremental detokenizer for one generation."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._text = ""  # latest full decode
        self._emitted = 0  # characters of _text already handed out
        self.stopped = False

    @property
    def emitted_text(self) -> str:
        """The text handed out so far."""
        return self._text[: self._emitted]

    def push(self, token_id: int) -> str:
        """Add a token; return the newly safe text. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._text = self._decode(self._ids)
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._release(cut)
        safe = len(self._text.rstrip(REPLACEMENT_CHAR))
        safe -= self._possible_stop_start(safe)
        return self._release(safe)

    def finish(self) -> str:
        """Release the held-back tail at the end of generation (nothing after a stop string)."""
        if self.stopped:
            return ""
        return self._release(len(self._text))

    def _release(self, end: int) -> str:
        if end <= self._emitted:
            return ""
        delta = self._text[self._emitted : end]
        self._emitted = end
        return delta

    def _first_stop(self) -> int | None:
        """Index of the earliest stop string at or after the emitted text (held text is never emitted)."""
        found = [i for s in self._stop if (i := self._text.find(s, self._emitted)) != -1]
        return min(found) if found else None

    def _possible_stop_start(self, end: int) -> int:
        """Length of the longest tail of text[:end] that is a proper prefix of a stop string."""
        longest = 0
        for stop in self._stop:
            for size in range(min(len(stop) - 1, end - self._emitted), longest, -1):
                if self._text.endswith(stop[:size], 0, end):
                    longest = size
                    break
        return longest
