"""The private behaviour of Celery and kombu the batcher relies on is still there; when an
upgrade moves it, this fails naming what moved (workers/runtime/celery_internals.py)."""

from __future__ import annotations

import pytest
from kombu.transport import redis as kombu_redis

from workers.runtime import celery_internals
from workers.runtime.celery_internals import FenceBroken


def test_celery_and_kombu_still_behave_as_the_batcher_relies_on():
    celery_internals.check()


def test_a_moved_private_name_fails_loudly_naming_it(monkeypatch):
    monkeypatch.delattr(kombu_redis.QoS, "_remove_from_indices")
    with pytest.raises(FenceBroken, match=r"QoS\._remove_from_indices"):
        celery_internals.check()
