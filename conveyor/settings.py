"""Reading settings from the environment, with errors that name the variable.

A malformed variable must stop a process at start with a message an operator can act on,
not surface an hour later as a ``ValueError`` deep inside a task.
"""

from __future__ import annotations

import os
from pathlib import Path


class ConfigError(ValueError):
    """An environment variable is set to something Conveyor cannot use."""


def env_str(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return default
    return value.strip()


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below its minimum of {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    raw = env_str(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={value} is below its minimum of {minimum}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(name: str, default: bool) -> bool:
    raw = env_str(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ConfigError(
        f"{name}={raw!r} is not a boolean (use one of 1/0, true/false, yes/no, on/off)"
    )


def conveyor_home() -> Path:
    """Where the dev stack keeps its data, logs and ``dev.env`` (``CONVEYOR_HOME``)."""
    return Path(env_str("CONVEYOR_HOME", ".conveyor"))


def dev_env_path() -> Path:
    return conveyor_home() / "dev.env"


def load_dev_env() -> None:
    """Point this process at a running ``conveyor dev`` stack's servers, when nothing else is
    configured: with neither REDIS_URL nor DATABASE_URL set, read ``CONVEYOR_HOME/dev.env``
    (written by the dev stack while it runs, removed when it stops)."""
    if env_str("REDIS_URL") or env_str("DATABASE_URL"):
        return
    path = dev_env_path()
    if not path.is_file():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip() and not line.lstrip().startswith("#"):
            os.environ.setdefault(name.strip(), value.strip().strip("'"))
