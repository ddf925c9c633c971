"""`conveyor dev` on a machine with nothing configured: it starts embedded servers, runs a
first job, serves Flower and `conveyor submit`, and leaves no process behind when stopped."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from tests.support.waiting import wait_for
from workers.dev.embedded import free_port

_OUR_VARIABLES = ("REDIS_URL", "DATABASE_URL", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND")


def _fresh_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _OUR_VARIABLES}
    env["CONVEYOR_HOME"] = str(home)
    return env


def _descendants(pid: int) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_dev_stack_runs_a_first_job_serves_submit_and_flower_and_stops_clean(tmp_path):
    home = tmp_path / "home"
    env = _fresh_env(home)
    flower_port = free_port()
    out_path = tmp_path / "dev.out"
    started = time.monotonic()
    with open(out_path, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "dev", f"--flower-port={flower_port}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "command to first job done" in out_path.read_text(),
            timeout=120,
            interval=0.25,
            what="first job of the dev stack",
        )
        first_job_s = time.monotonic() - started
        output = out_path.read_text()
        assert "embedded Valkey" in output and "embedded PostgreSQL" in output
        assert "'success': True" in output and "maintenance_complete" in output

        # Another shell, nothing configured: `conveyor submit` finds the stack through dev.env.
        submit = subprocess.run(
            [sys.executable, "-m", "workers.cli", "submit", "maintenance.ping", "--wait"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        assert submit.returncode == 0, submit.stderr
        job_id, envelope = submit.stdout.strip().splitlines()
        assert json.loads(envelope)["success"] is True

        # Flower lists the four pools and the job.
        def flower(path: str):
            with urllib.request.urlopen(f"http://127.0.0.1:{flower_port}{path}", timeout=10) as r:
                return json.load(r)

        workers = wait_for(lambda: flower("/api/workers?refresh=1"), timeout=30, what="flower")
        assert {name.split("@")[0] for name in workers} >= {"ai", "n8n", "episodes", "maintenance"}
        task = wait_for(
            lambda: (
                flower(f"/api/task/info/{job_id}").get("state") == "SUCCESS"
                and flower(f"/api/task/info/{job_id}")
            ),
            timeout=30,
            what="job in flower",
        )
        assert task["name"] == "maintenance.ping"

        # The gateway: its URL printed, the first job listed for the live page, /ui served.
        [gateway] = re.findall(r"live page: (http://127\.0\.0\.1:\d+)/ui/", output)
        with urllib.request.urlopen(f"{gateway}/api/v1/jobs?task=maintenance.ping") as r:
            listed = [j["job_id"] for j in json.load(r)["data"]["jobs"]]
        [first_job] = re.findall(r"first job (\S+) \(maintenance\.ping\)", output)
        assert first_job in listed and job_id in listed
        with urllib.request.urlopen(f"{gateway}/ui/") as r:
            assert b"<html" in r.read().lower()

        # Everything we will expect gone: its process tree, and the daemonized postmaster.
        tree = _descendants(dev.pid)
        postmaster = int((home / "postgres" / "postmaster.pid").read_text().split()[0])
        assert len(tree) >= 8  # valkey + 4 workers + beat + flower + gateway (+ pool children)
    finally:
        dev.send_signal(signal.SIGTERM)
        code = dev.wait(60)
    assert code == 0, out_path.read_text()[-3000:]
    leftovers = [pid for pid in (*tree, postmaster) if _alive(pid)]
    assert leftovers == [], f"stray processes: {leftovers}"
    assert not (home / "dev.env").exists()
    print(f"dev stack: command to first job {first_job_s:.1f}s")


def test_a_pool_that_cannot_start_is_named_and_the_rest_run(tmp_path):
    """A malformed n8n setting: `conveyor dev` says which process failed and why, does not
    restart it in a loop, and runs the first job on the pools that did start. A shell in any
    directory under the project finds the stack (no CONVEYOR_HOME: the nearest .conveyor)."""
    project = tmp_path / "project"
    deep = project / "src" / "deep"
    deep.mkdir(parents=True)
    env = _fresh_env(project / ".conveyor")
    del env["CONVEYOR_HOME"]
    env["N8N_WORKFLOWS"] = "{not json"
    out_path = tmp_path / "dev.out"
    with open(out_path, "wb") as out:
        dev = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "dev", f"--flower-port={free_port()}"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=project,
            start_new_session=True,
        )
    try:
        wait_for(
            lambda: "command to first job done" in out_path.read_text(),
            timeout=120,
            interval=0.25,
            what="first job of the dev stack",
        )
        submit = subprocess.run(
            [sys.executable, "-m", "workers.cli", "submit", "maintenance.ping", "--wait"],
            capture_output=True,
            text=True,
            env={k: v for k, v in env.items() if k != "N8N_WORKFLOWS"},
            cwd=deep,
            timeout=60,
        )
        assert submit.returncode == 0, submit.stderr
        assert "default broker" not in submit.stderr
        output = out_path.read_text()
        assert "worker-n8n FAILED to start" in output and "N8N_WORKFLOWS" in output
        assert "all worker pools ready" not in output
        assert "worker-n8n restarted" not in output
    finally:
        os.killpg(dev.pid, signal.SIGTERM)  # its whole process group, as a terminal's ^C or
        code = dev.wait(60)  # `kill -- -PGID` of `make dev` sends it
    assert code == 0, out_path.read_text()[-3000:]
    output = out_path.read_text()
    assert "stopped" in output.splitlines()[-1] and "Traceback" not in output


def test_submit_says_where_it_sends_when_nothing_is_configured(tmp_path):
    env = _fresh_env(tmp_path / "nowhere")
    del env["CONVEYOR_HOME"]
    result = subprocess.run(  # a bad payload: refused before anything is sent anywhere
        [sys.executable, "-m", "workers.cli", "submit", "maintenance.ping", "--data", "[]"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2
    assert "no REDIS_URL set and no running `conveyor dev` found" in result.stderr
    assert "redis://127.0.0.1:6379/0" in result.stderr
