"""A malformed setting stops a process at start with one line that names it; the client reads
only its own settings, and a worker only its own family's."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import pytest

from conveyor import Submitter
from conveyor.config import ClientConfig, Env, redact_url
from conveyor.errors import ConfigError

#: A worker-only setting that is malformed, and one of each family.
BROKEN_WORKER_ONLY = {
    "CONVEYOR_EPISODES_PREFETCH": "1",  # below the batch size: the episodes pool refuses it
    "CONVEYOR_AI_CONCURRENCY": "lots",
    "N8N_WORKFLOWS": "{not json",
    "LLM_PROVIDER": "gpt",
}


def _conveyor(*argv: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=timeout,
    )


def jwt_like_key(length: int = 300) -> str:
    """An n8n 2.x public API key has this shape: a signed JWT (header.payload.signature)."""
    header = base64.urlsafe_b64encode(b'{"alg":"HS256","typ":"JWT"}').decode().rstrip("=")
    body = base64.urlsafe_b64encode(json.dumps({"sub": "u" * 200}).encode()).decode().rstrip("=")
    key = f"{header}.{body}."
    return key + "s" * (length - len(key))


@pytest.mark.parametrize(
    ("pool", "env", "expected"),
    [
        (
            "ai",
            {"CONVEYOR_AI_CONCURRENCY": "lots"},
            "CONVEYOR_AI_CONCURRENCY='lots' is not a whole",
        ),
        ("ai", {"CONVEYOR_MAX_RETRIES": "-1"}, "CONVEYOR_MAX_RETRIES=-1 is below its minimum of 0"),
        ("maintenance", {"CONVEYOR_RETRY_BASE": "fast"}, "CONVEYOR_RETRY_BASE='fast' is not a"),
        ("maintenance", {"CONVEYOR_VISIBILITY_TIMEOUT": "60"}, "CONVEYOR_VISIBILITY_TIMEOUT=60"),
        ("episodes", {"CONVEYOR_EPISODES_PREFETCH": "1"}, "CONVEYOR_EPISODES_PREFETCH x"),
        ("ai", {"LLM_PROVIDER": "gpt", "LLM_BASE_URL": "http://x/v1"}, "LLM_PROVIDER='gpt'"),
        ("n8n", {"N8N_WORKFLOWS": "{not json"}, "N8N_WORKFLOWS is not valid JSON"),
        ("n8n", {"CONVEYOR_N8N_POLL_CAP": "soon"}, "CONVEYOR_N8N_POLL_CAP='soon' is not a"),
    ],
)
def test_a_worker_with_a_malformed_setting_stops_at_start_naming_it(pool, env, expected):
    result = _conveyor("worker", pool, env=env)
    assert result.returncode == 78, result.stderr  # EX_CONFIG: the dev supervisor won't loop
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_secret_in_a_malformed_setting_is_never_printed():
    secret = "hunter2-s3cr3t"
    env = {
        "N8N_BASE_URL": f"http://admin:{secret}@n8n.local:5678/webhook",
        "LLM_BASE_URL": f"ftp://user:{secret}@llm.local/v1",
    }
    for pool in ("n8n", "ai"):
        result = _conveyor("worker", pool, env=env)
        assert result.returncode == 78, result.stderr
        assert secret not in result.stderr + result.stdout
        assert "***" in result.stderr
    key = "x" * 4097  # over the cap: refused without showing it
    result = _conveyor("worker", "n8n", env={"N8N_BASE_URL": "http://n8n:5678", "N8N_API_KEY": key})
    assert result.returncode == 78 and "N8N_API_KEY is malformed" in result.stderr
    assert key not in result.stderr


def test_the_submitter_ignores_every_worker_only_setting(redis_url):
    """A calling service's environment may hold anything of the workers'."""
    script = (
        "from conveyor import Submitter; s = Submitter(); "
        "j = s.submit('maintenance.ping', {'message': 'x'}); print(j.id); s.close()"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={**os.environ, **BROKEN_WORKER_ONLY, "REDIS_URL": redis_url},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 36


def test_the_submitter_reads_only_the_config_it_is_given(redis_url, monkeypatch):
    monkeypatch.setenv("CONVEYOR_MAX_PAYLOAD_BYTES", "not a number")  # ignored: config given
    config = ClientConfig(redis_url=redis_url, max_payload_bytes=2048, episodes_pack=7)
    before = dict(os.environ)
    submitter = Submitter(config)
    try:
        assert submitter.config.max_payload_bytes == 2048
        assert submitter.app.conf.broker_url == redis_url
        assert submitter.app.conf.accept_content == ["json"]
    finally:
        submitter.close()
    assert dict(os.environ) == before


def test_client_config_from_env_names_a_malformed_variable():
    with pytest.raises(ConfigError, match="CONVEYOR_MAX_PAYLOAD_BYTES='big' is not a whole"):
        ClientConfig.from_env({"CONVEYOR_MAX_PAYLOAD_BYTES": "big"})
    with pytest.raises(ConfigError) as caught:
        ClientConfig.from_env({"REDIS_URL": "http://u:pw-secret@host:6379/0"})
    assert "pw-secret" not in str(caught.value) and "***" in str(caught.value)
    config = ClientConfig.from_env({"REDIS_URL": "redis://h:1/2", "CONVEYOR_EPISODES_PACK": "9"})
    assert (config.broker_url, config.result_backend_url) == ("redis://h:1/2", "redis://h:1/2")
    assert config.episodes_pack == 9 and config.configured
    assert not ClientConfig.from_env({}).configured


def test_env_reads_each_type_and_names_the_variable():
    env = Env({"A": " 7 ", "B": "", "C": "inf", "D": "1.5", "E": "[1]"})
    assert env.integer("A", 0) == 7
    assert env.integer("B", 3) == 3  # blank is unset
    with pytest.raises(ConfigError, match="C='inf' must be a finite number"):
        env.number("C", 1.0)
    with pytest.raises(ConfigError, match="C='inf' must be a positive number of seconds"):
        env.seconds("C", 1.0)
    assert env.seconds("D", 1.0) == 1.5
    assert env.json("E") == [1]
    with pytest.raises(ConfigError, match="A=7 is above its maximum of 5"):
        env.integer("A", 0, maximum=5)
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


def test_a_real_length_n8n_api_key_is_accepted(workers, n8n_server):
    """n8n 2.x keys are JWTs of ~270 characters: the n8n pool starts with one."""
    key = jwt_like_key(300)
    worker = workers.start("n8n", env={"N8N_BASE_URL": n8n_server.url, "N8N_API_KEY": key})
    assert worker.process.poll() is None
    assert key not in worker.log()


def test_a_malformed_n8n_setting_stops_only_the_n8n_pool(workers):
    env = {"N8N_WORKFLOWS": "{not json"}
    result = _conveyor("worker", "n8n", env=env)
    assert result.returncode == 78 and "N8N_WORKFLOWS" in result.stderr
    for pool in ("maintenance", "ai", "episodes"):
        worker = workers.start(pool, env=env)  # waits until it says it is ready
        assert worker.process.poll() is None


def test_flower_refuses_to_start_without_authentication_outside_dev():
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWER_")}
    env["CONVEYOR_ENV"] = "prod"
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert "FLOWER_BASIC_AUTH" in result.stderr


def test_the_client_needs_none_of_the_workers_dependencies(redis_url):
    """What `pip install .` (no `worker` extra) gives a submitting service is enough."""
    script = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in {'sqlalchemy', 'psycopg2', 'requests', 'flower',\n"
        "                                  'pybreaker', 'alembic', 'redbeat', 'urllib3'}:\n"
        "            raise ImportError(f'{name} is a worker dependency')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from conveyor import Submitter\n"
        "from conveyor.config import ClientConfig\n"
        f"s = Submitter(ClientConfig(redis_url={redis_url!r}))\n"
        "job = s.submit('maintenance.ping', {'message': 'client only'})\n"
        "print(job.id)\n"
        "s.close()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip()) == 36


@pytest.mark.parametrize(
    ("env", "argv", "code", "expected"),
    [
        ({"FLOWER_BASIC_AUTH": ":"}, (), 78, "credential 1 must be user:password"),
        ({"FLOWER_BASIC_AUTH": "ops:pw1,admin:"}, (), 78, "credential 2 must be user:password"),
        ({"FLOWER_BASIC_AUTH": "ops:CHANGE_ME"}, (), 78, "placeholder password"),
        ({"CONVEYOR_ENV": "dev"}, ("--address=0.0.0.0",), 2, "localhost only, not '0.0.0.0'"),
    ],
)
def test_flower_refuses_credentials_that_protect_nothing(env, argv, code, expected):
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("FLOWER_", "CONVEYOR_ENV"))}
    result = subprocess.run(
        [sys.executable, "-m", "workers.cli", "flower", *argv],
        capture_output=True,
        text=True,
        env={**clean, "CONVEYOR_ENV": "prod", **env},
        timeout=60,
    )
    assert result.returncode == code, result.stderr
    assert expected in result.stderr
    assert "pw1" not in result.stderr


def test_no_password_in_the_configuration_flower_and_inspect_show():
    """Celery censors only settings named like secrets and the broker/backend URLs."""
    script = (
        "from workers.app import app; "
        "print(repr(app.conf.humanize(with_defaults=False, censored=True)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "REDIS_URL": "redis://:s3cret-pw@127.0.0.1:6379/0",
            "CONVEYOR_BEAT_REDIS_URL": "redis://:s3cret-pw@127.0.0.1:6379/1",
        },
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret-pw" not in result.stdout
    assert "broker_url" in result.stdout


def test_celerys_own_environment_variables_cannot_redirect_the_submitter(redis_url, redis_client):
    """Celery reads CELERY_BROKER_URL and CELERY_RESULT_BACKEND from the environment over any
    configuration; a service whose own Celery uses them must still reach Conveyor's Redis."""
    script = (
        "from conveyor import Submitter; from conveyor.config import ClientConfig\n"
        f"s = Submitter(ClientConfig(redis_url={redis_url!r}))\n"
        "j = s.submit('maintenance.ping', {'message': 'here'}); print(j.id)\n"
        "print(s.app.backend.client.connection_pool.connection_kwargs['port'])\n"
    )
    elsewhere = "redis://127.0.0.1:1/0"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "CELERY_BROKER_URL": elsewhere,
            "CELERY_BROKER_WRITE_URL": elsewhere,
            "CELERY_RESULT_BACKEND": elsewhere,
        },
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    job_id, port = result.stdout.split()
    assert int(port) == int(redis_url.rsplit(":", 1)[1].split("/")[0])
    from tests.support.queues import messages, purge

    assert job_id in [m["headers"]["id"] for m in messages(redis_client, "maintenance")]
    purge(redis_client, "maintenance")
