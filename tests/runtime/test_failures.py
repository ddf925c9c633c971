"""The failure taxonomy and the backoff schedule, as plain functions."""

import random

import requests
import sqlalchemy.exc

from workers.failures import Permanent, Retryable, classify, compute_backoff


def test_backoff_grows_exponentially_with_jitter_and_a_cap():
    rng = random.Random(7)
    for attempt in range(12):
        step = min(60.0, 0.5 * 2**attempt)
        delays = [compute_backoff(attempt, base_s=0.5, cap_s=60.0, rng=rng) for _ in range(200)]
        assert all(step / 2 <= d <= step for d in delays)
        assert max(delays) - min(delays) > step / 4  # jittered, not one fixed value
    assert compute_backoff(1000, base_s=0.5, cap_s=60.0) <= 60.0


def test_infrastructure_outages_are_retryable_and_unknown_errors_are_not():
    assert isinstance(classify(requests.ConnectionError("refused")), Retryable)
    assert isinstance(
        classify(sqlalchemy.exc.OperationalError("x", {}, Exception("down"))), Retryable
    )
    verdict = classify(KeyError("model"))
    assert isinstance(verdict, Permanent)
    assert "KeyError" in str(verdict)
    explicit = Retryable("429", delay_s=3.0)
    assert classify(explicit) is explicit
