"""What a JSON value must be for every worker and Postgres to take it.

Python's ``json`` accepts more than the rest of the path does. Postgres refuses ``NaN`` and
``Infinity`` (not JSON numbers), U+0000 in ``text`` and in ``jsonb`` strings and keys, and text
that is not valid UTF-8 (a lone surrogate, which Python strings can hold); other services'
JSON decoders hold integers in 64 bits; and every recursive encoder or decoder on the way
(Python's ``json``, kombu, Postgres' ``jsonb`` parser) has a depth at which it fails.
``json_problems`` finds all of that in one iterative walk (never a ``RecursionError``, whatever
the depth), so the submitter refuses it with the field's path instead of a worker or the
database refusing it later.
"""

from __future__ import annotations

import json
import math
from typing import Any, NamedTuple

#: Deepest nesting accepted, counting the payload object itself as level 1
#: (``{"metadata": {"a": [1]}}`` is 3 levels). Real payloads use a handful of levels; 64 leaves
#: plenty of room while staying far below every recursive consumer of the payload: Python's
#: ``json`` fails near 1,000 levels minus whatever stack its caller already uses (so a payload
#: that encodes in a shallow client may fail in a worker's deep stack), and a worker
#: re-encodes a payload several times (message, dead letter, ``jsonb`` column). It also caps
#: what a hostile payload can make the walk and those encoders do.
MAX_DEPTH = 64

#: Integers travel as JSON numbers that other services decode into 64-bit integers.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
#: Postgres ``INTEGER`` columns (``episodic_logs``' token counts).
INT32_MAX = 2**31 - 1

#: Set in a pydantic validation context when the whole payload is known to pass
#: ``json_problems``: validators need not look for NUL again.
CHECKED = "conveyor.json_checked"

#: Kinds of problem (``JsonProblem.kind``).
DEPTH = "depth"
NUMBER = "number"
NUL = "nul"
UNICODE = "unicode"
TYPE = "type"

Path = tuple[Any, ...]


class JsonProblem(NamedTuple):
    """One value that is not storable JSON, at ``path`` (keys and list indexes from the top)."""

    path: Path
    kind: str
    message: str

    def __str__(self) -> str:
        path = self.path
        if len(path) > 8:  # a too-deep value: where it starts is enough to find it
            return f"{format_path(path[:6])}...: {self.message}"
        return f"{format_path(path)}: {self.message}"


def format_path(path: Path) -> str:
    """``messages.0.content``; a key that would garble a one-line message (NUL, a newline, a
    lone surrogate) is shown escaped, and one over 100 characters cut short, as a JSON string."""
    if not path:
        return "payload"
    return ".".join(_format_part(part) for part in path)


def _format_part(part: Any) -> str:
    if isinstance(part, int) and not isinstance(part, bool):
        return str(part)
    text = part if isinstance(part, str) else repr(part)
    if text.isprintable() and len(text) <= 100:
        return text
    shown = json.dumps(text[:100])  # ASCII only: escapes NUL, newlines and surrogates
    return shown + ("..." if len(text) > 100 else "")


def compact_size(value: Any) -> tuple[int | None, bool]:
    """``(size, clean)``: the bytes of ``value`` as compact UTF-8 JSON (None when ``json`` cannot
    write it), and whether it certainly holds nothing ``json_problems`` would name.

    The screen costs little beyond the encoding the size needs: ``json`` refuses NaN and
    Infinity (``allow_nan=False``) and writes every NUL as ``\\u0000``; strict UTF-8 refuses a
    lone surrogate; an integer outside 64 bits has 19 digits or more; and each level of nesting
    adds a ``{`` or ``[``. Text that merely looks suspect (the six characters ``\\u0000``, many
    brackets or digits inside strings) is not clean: the walk then decides.
    """
    try:
        text = _COMPACT.encode(value)
    except (TypeError, ValueError, RecursionError):
        return None, False
    try:
        data = text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return len(text.encode("utf-8", "surrogatepass")), False
    clean = not (
        b"\\u0000" in data
        or data.count(b"{") + data.count(b"[") > MAX_DEPTH
        or _NINETEEN_DIGITS in data.translate(_DIGITS_AS_ZERO)  # a regex is 10x slower
    )
    return len(data), clean


_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
#: Every ASCII digit as ``0``, every other byte as a space (UTF-8 has no other digit bytes).
_DIGITS_AS_ZERO = bytes(0x30 if 0x30 <= b <= 0x39 else 0x20 for b in range(256))
_NINETEEN_DIGITS = b"0" * 19


def json_problems(
    value: Any, *, max_depth: int = MAX_DEPTH, int64: bool = True, limit: int = 10
) -> list[JsonProblem]:
    """Every place (at most ``limit``) where ``value`` is not JSON that workers and Postgres
    store as it is: NaN or ±Infinity; U+0000 in a string or key; a lone surrogate; with
    ``int64``, an integer outside 64 bits; a value JSON cannot hold (a ``datetime``, a
    ``set``); nesting deeper than ``max_depth``. Nothing below ``max_depth`` is looked at.

    One iterative walk: plain JSON values (what ``json.loads`` builds) take the fast path;
    subclasses (``str`` enums, tuples) are checked like their base type.
    """
    problems: list[JsonProblem] = []
    containers: list[tuple[Any, Path]] = []
    kind = _kind(value)
    if kind is None:
        problem = _scalar_problem(value, int64)
        return [JsonProblem((), *problem)] if problem else []
    containers.append((value, ()))
    isfinite = math.isfinite
    while containers:
        node, path = containers.pop()
        if len(path) >= max_depth:
            problems.append(JsonProblem(path, DEPTH, f"nested deeper than {max_depth} levels"))
            if len(problems) >= limit:
                break
            continue
        nested: list[tuple[Any, Path]] = []
        is_dict = isinstance(node, dict)
        for key, item in node.items() if is_dict else enumerate(node):
            if is_dict and (type(key) is not str or "\x00" in key or not key.isascii()):
                key_problem = _key_problem(key)
                if key_problem:
                    problems.append(JsonProblem((*path, key), *key_problem))
            t = type(item)
            if t is str:
                if "\x00" in item or not (item.isascii() or _utf8(item)):
                    problems.append(JsonProblem((*path, key), *_text_problem(item)))
            elif t is dict or t is list:
                nested.append((item, (*path, key)))
            elif t is float:
                if not isfinite(item):
                    problems.append(JsonProblem((*path, key), *_float_problem(item)))
            elif t is int:
                if int64 and not INT64_MIN <= item <= INT64_MAX:
                    problems.append(JsonProblem((*path, key), *_INT_PROBLEM))
            elif t is bool or item is None:
                pass
            elif _kind(item) is not None:
                nested.append((item, (*path, key)))
            else:
                problem = _scalar_problem(item, int64)
                if problem:
                    problems.append(JsonProblem((*path, key), *problem))
        if len(problems) >= limit:
            break
        nested.reverse()  # the first child is looked at first: problems in document order
        containers.extend(nested)
    return problems[:limit]


_INT_PROBLEM = (NUMBER, f"must be an integer from {INT64_MIN} to {INT64_MAX} (64 bits)")


def _kind(value: Any) -> str | None:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list | tuple):
        return "array"
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _text_problem(text: str) -> tuple[str, str]:
    if "\x00" in text:
        return NUL, "must not contain NUL (\\x00) characters"
    return UNICODE, "must be valid Unicode text (it holds a lone surrogate, not UTF-8 encodable)"


def _float_problem(number: float) -> tuple[str, str]:
    shown = "NaN" if number != number else ("Infinity" if number > 0 else "-Infinity")
    return NUMBER, f"must be a finite number, not {shown}"


def _key_problem(key: Any) -> tuple[str, str] | None:
    if isinstance(key, str):
        if "\x00" in key:
            return NUL, "key must not contain NUL (\\x00) characters"
        if not _utf8(key):
            return UNICODE, "key must be valid Unicode text (it holds a lone surrogate)"
        return None
    if key is None or isinstance(key, int | float):  # json writes these as strings
        return None
    return TYPE, f"key must be a string, not {type(key).__name__}"


def _scalar_problem(value: Any, int64: bool) -> tuple[str, str] | None:
    if isinstance(value, str):
        ok = "\x00" not in value and (value.isascii() or _utf8(value))
        return None if ok else _text_problem(value)
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        return _INT_PROBLEM if int64 and not INT64_MIN <= value <= INT64_MAX else None
    if isinstance(value, float):
        return None if math.isfinite(value) else _float_problem(value)
    return TYPE, f"must be a JSON value, not {type(value).__name__}"


__all__ = [
    "CHECKED",
    "INT32_MAX",
    "INT64_MAX",
    "INT64_MIN",
    "MAX_DEPTH",
    "JsonProblem",
    "compact_size",
    "format_path",
    "json_problems",
]
