"""Finding a running ``conveyor dev`` stack from a shell that configured nothing.

``conveyor dev`` writes ``dev.env`` (the embedded servers' URLs) into its home while it runs.
Only the ``conveyor`` command looks for it, never the library: a service that builds a
``Submitter()`` gets exactly what its own environment says.

The home is ``CONVEYOR_HOME`` when set; else the nearest ``.conveyor`` folder in the current
directory or one of its parents (so any directory inside the project finds the stack); else
``./.conveyor``.
"""

from __future__ import annotations

import os
from pathlib import Path

from conveyor.config import Env

DEV_ENV = "dev.env"
HOME_DIR = ".conveyor"


def conveyor_home(cwd: Path | None = None) -> Path:
    configured = Env().text("CONVEYOR_HOME")
    if configured:
        return Path(configured)
    here = (cwd or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / HOME_DIR).is_dir():
            return folder / HOME_DIR
    return here / HOME_DIR


def dev_env_path(cwd: Path | None = None) -> Path:
    return conveyor_home(cwd) / DEV_ENV


def read_dev_env(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if sep and name.strip():
            values[name.strip()] = value.strip().strip("'")
    return values


def write_dev_env(redis_url: str, database_url: str, gateway_url: str = "") -> Path:
    path = dev_env_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by `conveyor dev` while it runs: `source` it to reach the dev stack.\n"
        f"export REDIS_URL='{redis_url}'\nexport DATABASE_URL='{database_url}'\n"
        + (f"export CONVEYOR_GATEWAY_URL='{gateway_url}'\n" if gateway_url else ""),
        encoding="utf-8",
    )
    return path


def use_running_stack() -> Path | None:
    """Point this ``conveyor`` process at a running dev stack's servers when nothing else is
    configured (neither ``REDIS_URL`` nor ``DATABASE_URL``); the ``dev.env`` used, or None."""
    env = Env()
    if env.is_set("REDIS_URL") or env.is_set("DATABASE_URL"):
        return None
    path = dev_env_path()
    if not path.is_file():
        return None
    for name, value in read_dev_env(path).items():
        os.environ.setdefault(name, value)
    return path


def child_environment(defaults: dict[str, str], **pinned: str) -> dict[str, str]:
    """The environment of the stack's processes: ``defaults`` under this process's own
    environment, ``pinned`` over it; this process takes it too (its first job submits)."""
    env = {**defaults, **os.environ, **pinned}
    os.environ.update(env)
    return env
