"""Dataset formats: line-by-line validation and a normalized example shape.

The API validates uploads with `validate_jsonl`; the worker reads examples with
`iter_examples`. Neither needs torch.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Literal

if TYPE_CHECKING:
    from core.storage import Storage

DatasetFormat = Literal["chat", "prompt_completion", "alpaca", "text", "preference"]
CHAT_ROLES = ("system", "user", "assistant")
PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
MAX_REPORTED_ERRORS = 20
UTF8_BOM = b"\xef\xbb\xbf"


@dataclass
class Message:
    """One chat turn; `weight=0` switches the loss off on an assistant turn."""

    role: str
    content: str
    weight: int = 1


@dataclass
class Example:
    """One training example in a format-independent shape.

    A preference example keeps its input in `messages` and its two assistant answers in `chosen`/`rejected`.
    """

    format: DatasetFormat
    messages: list[Message] = field(default_factory=list)
    prompt: str = ""
    completion: str = ""
    text: str = ""
    chosen: str = ""
    rejected: str = ""


class LineError(ValueError):
    """A dataset line that is not a valid example."""


def _require_string(obj: dict, key: str, *, allow_empty: bool = False) -> str:
    if key not in obj:
        raise LineError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise LineError(f"field '{key}' must be a string")
    if not allow_empty and not value.strip():
        raise LineError(f"field '{key}' is empty")
    return value


def _reject_extra(obj: dict, allowed: set[str], where: str = "") -> None:
    extra = sorted(set(obj) - allowed)
    if extra:
        prefix = f"{where} has unexpected" if where else "unexpected"
        raise LineError(f"{prefix} field(s): {', '.join(repr(k) for k in extra)}")


def _parse_message(message: object, where: str, roles: tuple[str, ...] = CHAT_ROLES, *,
                   weighted: bool = False) -> Message:
    """One chat message, its errors named after `where`; `weight` is allowed only when `weighted`."""
    if not isinstance(message, dict):
        raise LineError(f"{where} must be an object")
    _reject_extra(message, {"role", "content", "name"} | ({"weight"} if weighted else set()), where)
    role = message.get("role")
    if role not in roles:
        expected = f"one of {', '.join(roles)}" if len(roles) > 1 else roles[0]
        raise LineError(f"{where}.role must be {expected}, got {role!r}")
    content = message.get("content")
    if not isinstance(content, str):
        raise LineError(f"{where}.content must be a string")
    if not content.strip():
        raise LineError(f"{where}.content is empty")
    weight = message.get("weight", 1)
    if "weight" in message and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        raise LineError(f"{where}.weight must be 0 or 1, and only on assistant messages")
    return Message(role=role, content=content, weight=int(weight))


def _parse_chat(obj: dict) -> Example:
    _reject_extra(obj, {"messages"})
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineError("field 'messages' must be a non-empty list")
    parsed = [_parse_message(m, f"messages[{i}]", weighted=True) for i, m in enumerate(messages)]
    if not any(m.role == "assistant" for m in parsed):
        raise LineError("no assistant message: there is nothing to learn")
    if not any(m.role == "assistant" and m.weight for m in parsed):
        raise LineError("every assistant message has weight 0: there is nothing to learn")
    return Example(format="chat", messages=parsed)


def _parse_prompt_completion(obj: dict) -> Example:
    _reject_extra(obj, {"prompt", "completion"})
    return Example(
        format="prompt_completion",
        prompt=_require_string(obj, "prompt", allow_empty=True),
        completion=_require_string(obj, "completion"),
    )


def _parse_alpaca(obj: dict) -> Example:
    _reject_extra(obj, {"instruction", "input", "output"})
    instruction = _require_string(obj, "instruction")
    extra_input = _require_string(obj, "input", allow_empty=True) if "input" in obj else ""
    output = _require_string(obj, "output")
    user = f"{instruction}\n\n{extra_input}" if extra_input.strip() else instruction
    return Example(
        format="alpaca",
        messages=[Message("user", user), Message("assistant", output)],
    )


def _parse_text(obj: dict) -> Example:
    _reject_extra(obj, {"text"})
    return Example(format="text", text=_require_string(obj, "text"))


def _parse_output(obj: dict, key: str) -> str:
    output = obj[key]
    if not isinstance(output, list) or len(output) != 1:
        raise LineError(f"{key} must hold exactly one assistant message")
    return _parse_message(output[0], f"{key}[0]", ("assistant",)).content


def _parse_preference(obj: dict) -> Example:
    """OpenAI's DPO line: `input.messages` ending on a user turn, then two one-message assistant answers."""
    _reject_extra(obj, set(PREFERENCE_KEYS))
    for key in PREFERENCE_KEYS:
        if key not in obj:
            raise LineError(f"missing field '{key}'")
    given = obj["input"]
    if not isinstance(given, dict):
        raise LineError("field 'input' must be an object")
    for key in ("tools", "parallel_tool_calls"):
        if key in given:
            raise LineError(f"input.{key} is not supported: preference examples cannot carry tools")
    _reject_extra(given, {"messages"}, "input")
    if "messages" not in given:
        raise LineError("missing field 'input.messages'")
    messages = given["messages"]
    if not isinstance(messages, list) or not messages:
        raise LineError("input.messages must be a non-empty list")
    parsed = [_parse_message(m, f"input.messages[{i}]") for i, m in enumerate(messages)]
    if parsed[-1].role != "user":
        raise LineError(f"input.messages[{len(parsed) - 1}].role must be user: the last input message is the one "
                        f"the outputs answer, got {parsed[-1].role!r}")
    chosen, rejected = _parse_output(obj, "preferred_output"), _parse_output(obj, "non_preferred_output")
    if chosen.strip() == rejected.strip():
        raise LineError("preferred_output and non_preferred_output are identical")
    return Example(format="preference", messages=parsed, chosen=chosen, rejected=rejected)


def _is_preference(obj: dict) -> bool:
    # An alpaca line names `instruction` (or `output`): its `input` key means nothing alone.
    if "instruction" in obj:
        return False
    return "preferred_output" in obj or "non_preferred_output" in obj or ("input" in obj and "output" not in obj)


def detect_format(obj: dict) -> DatasetFormat:
    """Name the format a JSON object is written in, from its keys."""
    if _is_preference(obj):
        return "preference"
    if "messages" in obj:
        return "chat"
    if "prompt" in obj or "completion" in obj:
        return "prompt_completion"
    if "instruction" in obj or "output" in obj:
        return "alpaca"
    if "text" in obj:
        return "text"
    raise LineError(
        "unknown example format: expected 'messages' (chat), 'prompt'/'completion', "
        "'instruction'/'output' (alpaca), 'text' or 'input'/'preferred_output'/'non_preferred_output' (preference)"
    )


_PARSERS = {
    "chat": _parse_chat,
    "prompt_completion": _parse_prompt_completion,
    "alpaca": _parse_alpaca,
    "text": _parse_text,
    "preference": _parse_preference,
}


def parse_line(raw: bytes | str, expected: DatasetFormat | None = None) -> Example:
    """Parse one JSONL line into an Example, or raise LineError saying why."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LineError(f"not valid UTF-8 (byte {exc.start})") from None
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LineError(f"invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise LineError("each line must be a JSON object")
    fmt = detect_format(obj)
    if expected is not None and fmt != expected:
        raise LineError(f"line is in {fmt} format, but the file started in {expected} format")
    return _PARSERS[fmt](obj)


@dataclass
class ValidationReport:
    """What `validate_jsonl` found: the format, the count and the first errors."""

    format: DatasetFormat | None = None
    n_examples: int = 0
    n_errors: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.n_errors == 0 and self.n_examples > 0

    def details(self) -> str | None:
        """A readable summary for the file's `status_details`."""
        if self.n_examples == 0 and self.n_errors == 0:
            return "the file holds no examples"
        if not self.n_errors:
            return None
        shown = "; ".join(self.errors)
        more = self.n_errors - len(self.errors)
        suffix = f"; and {more} more" if more > 0 else ""
        return f"{self.n_errors} invalid line(s): {shown}{suffix}"


class ReportBuilder:
    """Feed lines one by one (streaming), then read `report`."""

    def __init__(self) -> None:
        self.report = ValidationReport()
        self._line_no = 0
        self.last_error: str | None = None

    def feed(self, raw: bytes) -> None:
        """Validate one line (without its newline)."""
        self._line_no += 1
        if self._line_no == 1:
            raw = raw.removeprefix(UTF8_BOM)
        if not raw.strip():
            return
        try:
            example = parse_line(raw, self.report.format)
        except LineError as exc:
            self._error(str(exc))
            return
        except RecursionError:
            self._error("nested too deeply")
            return
        self.report.format = self.report.format or example.format
        self.report.n_examples += 1

    def refuse_line(self, reason: str) -> None:
        """Count the next line as invalid without parsing it."""
        self._line_no += 1
        self._error(reason)

    @property
    def line_no(self) -> int:
        """The number of the line fed last (1-based)."""
        return self._line_no

    def _error(self, reason: str) -> None:
        self.last_error = reason
        self.report.n_errors += 1
        if len(self.report.errors) < MAX_REPORTED_ERRORS:
            self.report.errors.append(f"line {self._line_no}: {reason}")


def skip_rest_of_line(fh: BinaryIO) -> None:
    """Read past the rest of an over-long line."""
    while (chunk := fh.readline(1024 * 1024)) and not chunk.endswith(b"\n"):
        pass


def validate_file(path: str | Path, max_line_bytes: int) -> ValidationReport:
    """Validate a JSONL file in one linear pass, refusing lines longer than `max_line_bytes`."""
    with open(path, "rb") as fh:
        return validate_stream(fh, max_line_bytes)


def validate_stored(storage: Storage, key: str, max_line_bytes: int) -> ValidationReport:
    """Validate a stored JSONL object while streaming it (no local copy, whatever the backend)."""
    with storage.open_read(key) as fh:
        return validate_stream(fh, max_line_bytes)


def validate_stream(fh: BinaryIO, max_line_bytes: int) -> ValidationReport:
    """Validate JSONL from a buffered binary stream in one linear pass, refusing lines over `max_line_bytes`."""
    builder = ReportBuilder()
    while line := fh.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            skip_rest_of_line(fh)
            builder.refuse_line(f"longer than the limit of {max_line_bytes} bytes")
            continue
        builder.feed(line.rstrip(b"\r\n"))
    return builder.report


def validate_jsonl(lines: Iterable[bytes]) -> ValidationReport:
    """Validate JSONL lines (bytes, without newlines) and report."""
    builder = ReportBuilder()
    for raw in lines:
        builder.feed(raw)
    return builder.report


def iter_examples(lines: Iterable[bytes]) -> Iterator[Example]:
    """Yield the examples of an already validated file."""
    fmt: DatasetFormat | None = None
    for index, raw in enumerate(lines):
        if index == 0:
            raw = raw.removeprefix(UTF8_BOM)
        if raw.strip():
            example = parse_line(raw, fmt)
            fmt = example.format
            yield example


def read_examples(path: str) -> list[Example]:
    """Load every example of a validated JSONL file."""
    with open(path, "rb") as fh:
        return list(iter_examples(line.rstrip(b"\r\n") for line in fh))
