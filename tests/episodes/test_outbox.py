"""The episode outbox's group commit, as plain code: threads that log within one window share
one send, every caller returns only after its send, and a failed send fails them all."""

from __future__ import annotations

import threading
import time

import pytest

from workers.episodes.outbox import EpisodeNotSent, EpisodeOutbox
from workers.failures import Retryable


def log_from_threads(outbox: EpisodeOutbox, n: int) -> list[BaseException | None]:
    outcomes: list[BaseException | None] = [None] * n

    def one(i: int) -> None:
        try:
            outbox.put((f"r{i}", {"i": i}))
        except BaseException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    return outcomes


def test_records_logged_within_a_window_go_in_one_send_and_callers_wait_for_it():
    sends: list[tuple[float, list[str]]] = []
    outbox = EpisodeOutbox(
        lambda records: sends.append((time.monotonic(), [r for r, _ in records])),
        window_s=0.2,
        max_records=100,
    )
    started = time.monotonic()
    assert log_from_threads(outbox, 10) == [None] * 10
    assert len(sends) == 1
    sent_at, ids = sends[0]
    assert sorted(ids) == sorted(f"r{i}" for i in range(10))
    assert sent_at - started >= 0.2  # the leader waited its window


def test_a_full_message_is_sent_and_the_next_record_starts_another():
    sends: list[list[str]] = []
    outbox = EpisodeOutbox(
        lambda records: sends.append([r for r, _ in records]), window_s=0.2, max_records=4
    )
    assert log_from_threads(outbox, 10) == [None] * 10
    assert sorted(r for ids in sends for r in ids) == sorted(f"r{i}" for i in range(10))
    assert all(len(ids) <= 4 for ids in sends) and len(sends) >= 3


def test_a_failed_send_fails_every_record_in_it_as_retryable():
    def broker_away(records):
        raise ConnectionError("broker unreachable")

    outbox = EpisodeOutbox(broker_away, window_s=0.1, max_records=100)
    outcomes = log_from_threads(outbox, 5)
    assert all(isinstance(o, EpisodeNotSent) for o in outcomes), outcomes
    assert all(isinstance(o, Retryable) for o in outcomes)
    assert all("broker unreachable" in str(o) for o in outcomes)
    with pytest.raises(EpisodeNotSent):  # and the outbox keeps working afterwards: a new try
        outbox.put(("again", {}))
