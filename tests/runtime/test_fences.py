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


def test_the_one_trip_result_store_keeps_a_success_and_is_read_by_celery(redis_url):
    """ResultBackend writes what Celery's backend writes, in one script, and, like Celery's,
    never lets a late copy overwrite a stored SUCCESS."""
    import uuid

    from celery import Celery, states
    from celery.result import AsyncResult

    from workers.runtime.celery_internals import ResultBackend

    app = Celery("fence-test", set_as_current=False)
    app.conf.result_backend = redis_url
    app.conf.result_serializer = "json"
    app.conf.accept_content = app.conf.result_accept_content = ["json"]
    backend = ResultBackend(app=app, url=redis_url)
    job_id = str(uuid.uuid4())
    backend.store_result(job_id, {"success": True, "data": {"n": 1}}, states.SUCCESS)
    backend.store_result(job_id, ValueError("late copy"), states.FAILURE)
    result = AsyncResult(job_id, app=app)  # read through Celery's own backend
    assert result.state == states.SUCCESS
    assert result.get(timeout=5) == {"success": True, "data": {"n": 1}}
    other = str(uuid.uuid4())
    backend.store_result(other, ValueError("boom"), states.FAILURE)
    assert AsyncResult(other, app=app).state == states.FAILURE
