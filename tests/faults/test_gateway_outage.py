"""The gateway while its Redis (the broker) is killed and restarted: every request answers in
the envelope — 503 with Retry-After for what needs Redis, /health still 200, /ready naming what
is down — never a 500 and never a hang, an open event stream ending so its client reconnects;
and once Redis is back, it serves again."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.gateway.conftest import start_gateway
from tests.support.waiting import wait_for
from workers.dev.embedded import EmbeddedRedis

pytestmark = [pytest.mark.faults, pytest.mark.timeout(180)]


def test_broker_down_is_503_with_retry_after_and_the_gateway_recovers(tmp_path: Path):
    data = tmp_path / "valkey"
    valkey = EmbeddedRedis(data, persist=True)
    url = valkey.start()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    env = {
        "CONVEYOR_ENV": "dev",
        "CONVEYOR_GATEWAY_KEYS": "",
        "REDIS_URL": url,
        "CELERY_BROKER_URL": url,
        "CELERY_RESULT_BACKEND": url,
        "CONVEYOR_GATEWAY_KEEPALIVE": "1",  # an idle stream looks at Redis every second
    }
    gateway = start_gateway(tmp_path / "gateway.log", env)
    restarted: EmbeddedRedis | None = None
    body = {"task": "maintenance.ping", "payload": {"message": "outage"}}
    try:
        first = httpx.post(f"{gateway.url}/api/v1/jobs", json=body, timeout=30)
        assert first.status_code == 202, first.text
        job_id = first.json()["data"]["job_id"]
        # A stream open when Redis dies (no worker runs the job: it idles) must end, so its
        # client reconnects with Last-Event-ID, instead of hanging on a dead connection.
        ended = threading.Event()

        def follow() -> None:
            with httpx.stream("GET", f"{gateway.url}/api/v1/jobs/{job_id}/events", timeout=60) as r:
                for _ in r.iter_lines():
                    pass
            ended.set()

        threading.Thread(target=follow, daemon=True).start()
        time.sleep(0.5)

        os.kill(valkey.pid or 0, signal.SIGKILL)
        time.sleep(0.5)
        for method, path, kwargs in (
            ("POST", "/api/v1/jobs", {"json": body}),
            ("GET", "/api/v1/jobs", {}),
            ("GET", f"/api/v1/jobs/{job_id}", {}),
            ("GET", f"/api/v1/jobs/{job_id}/events", {}),
        ):
            started = time.monotonic()
            response = httpx.request(method, f"{gateway.url}{path}", timeout=60, **kwargs)
            assert response.status_code == 503, (path, response.status_code, response.text)
            assert response.headers["retry-after"].isdigit()
            assert response.json()["success"] is False and "unreachable" in response.json()["error"]
            assert time.monotonic() - started < 30, f"{path} hung while Redis was down"
        assert ended.wait(20), "an open event stream hung after Redis died"
        assert httpx.get(f"{gateway.url}/health").status_code == 200
        ready = httpx.get(f"{gateway.url}/ready", timeout=30)
        assert ready.status_code == 503 and "redis" in ready.json()["data"]["down"]

        restarted = EmbeddedRedis(data, port=port, persist=True)
        assert restarted.start() == url
        again = wait_for(
            lambda: (
                (r := httpx.post(f"{gateway.url}/api/v1/jobs", json=body, timeout=30)).status_code
                == 202
                and r
            ),
            timeout=60,
            interval=0.5,
            what="a submit after Redis came back",
        )
        assert again.json()["success"] is True
        assert httpx.get(f"{gateway.url}/ready", timeout=30).status_code == 200
        assert "Exception in ASGI application" not in gateway.log()
    finally:
        gateway.stop()
        for server in (restarted, valkey):
            if server is not None:
                server.stop()
