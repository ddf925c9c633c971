"""How long an upstream asked us to wait: ``Retry-After`` (and OpenAI's ``retry-after-ms``),
read one way for every HTTP client (LLM providers, n8n)."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Mapping

#: Seconds: the longest wait a server may ask of us. A longer ask is capped, not obeyed: the
#: job's own backoff and the circuit breaker take over from there.
RETRY_AFTER_CAP_S = 120.0


def retry_after_s(
    headers: Mapping[str, str], *, now: float | None = None, cap_s: float = RETRY_AFTER_CAP_S
) -> float | None:
    """The wait a response asks for, in seconds, capped at ``cap_s``; None if none
    (then the job's own backoff decides).

    ``retry-after-ms`` (OpenAI's, milliseconds) wins over ``retry-after`` (seconds or an HTTP
    date). ``headers`` must look names up case-insensitively, as ``requests``' do.
    """
    seconds: float | None = None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            seconds = float(raw_ms) / 1000
        except ValueError:
            seconds = None
    raw = headers.get("retry-after")
    if seconds is None and raw:
        try:
            seconds = float(raw)
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is not None:
                seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds is None or not seconds > 0:  # missing, NaN, or a date already past (skew)
        return None
    return min(seconds, cap_s)
