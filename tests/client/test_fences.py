"""The client's one lean on Celery's private behaviour (``_ClientApp._get_backend``): a submit
makes no result-channel subscription, and a caller that waits still gets its result, even
for a job that ended before it started waiting. Fails loudly when a Celery upgrade moves it."""

from __future__ import annotations

import inspect
import time

from celery import Celery
from celery.backends.asynchronous import AsyncBackendMixin

from conveyor import Submitter


def test_celery_still_has_what_the_client_overrides():
    assert hasattr(Celery, "_get_backend"), "Celery._get_backend is gone: see _ClientApp"
    assert "on_task_call" in inspect.getsource(Celery.send_task), (
        "send_task no longer calls backend.on_task_call: _ClientApp's override is moot"
    )
    assert "consume_from" in inspect.getsource(AsyncBackendMixin._add_pending_result), (
        "AsyncResult.get no longer subscribes for itself: waiting callers would hang"
    )


def test_a_submit_subscribes_to_nothing_and_a_late_waiter_gets_the_result(
    workers, redis_client, redis_url
):
    workers.start("maintenance")
    submitter = Submitter(redis_url=redis_url)
    try:
        before = redis_client.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)
        jobs = [submitter.submit("maintenance.ping", {"message": f"m{n}"}) for n in range(20)]
        after = redis_client.info("commandstats").get("cmdstat_subscribe", {}).get("calls", 0)
        assert after == before, f"{after - before} SUBSCRIBE calls for 20 submits"
        time.sleep(2)  # the jobs end before anyone waits
        assert all(job.result(timeout=30)["success"] for job in jobs)
    finally:
        submitter.close()
