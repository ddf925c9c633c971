"""A malformed setting stops a process at start with an error that names it."""

import os
import subprocess
import sys

import pytest


def _import_config(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import celeryconfig"],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        (
            {"CONVEYOR_AI_CONCURRENCY": "lots"},
            "CONVEYOR_AI_CONCURRENCY='lots' is not a whole number",
        ),
        ({"CONVEYOR_MAX_RETRIES": "-1"}, "CONVEYOR_MAX_RETRIES=-1 is below its minimum of 0"),
        ({"CONVEYOR_RETRY_BASE": "fast"}, "CONVEYOR_RETRY_BASE='fast' is not a number"),
        ({"CONVEYOR_VISIBILITY_TIMEOUT": "60"}, "CONVEYOR_VISIBILITY_TIMEOUT=60 must exceed"),
    ],
)
def test_bad_environment_variable_is_named(env, expected):
    result = _import_config(**env)
    assert result.returncode != 0
    assert "ConfigError" in result.stderr
    assert expected in result.stderr


def test_good_environment_is_read():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import celeryconfig as c; print(c.conveyor_pools['ai']['concurrency'])",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "CONVEYOR_AI_CONCURRENCY": "77"},
    )
    assert result.stdout.strip() == "77"


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
