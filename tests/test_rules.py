"""Rules of the layout that no import contract can express, checked on the source itself
(the import contracts are in setup.cfg, run by `make lint`)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The settings modules: the only ones that read the environment (ARCHITECTURE.md, rule 4).
SETTINGS_MODULES = {
    "conveyor/config.py",
    "workers/settings.py",
    "celeryconfig.py",
    "workers/dev/env.py",
    "ops/flowerconfig.py",
}


def _sources() -> list[Path]:
    files = [ROOT / "celeryconfig.py", ROOT / "beat_schedule.py"]
    for folder in ("conveyor", "workers", "tasks", "ops"):
        files += sorted((ROOT / folder).rglob("*.py"))
    return [f for f in files if "migrations" not in f.parts]


def _reads_environment(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and node.attr in ("environ", "getenv", "environb")
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
        ):
            lines.append(node.lineno)
    return lines


def test_only_the_settings_modules_read_the_environment():
    offenders = {}
    for path in _sources():
        relative = path.relative_to(ROOT).as_posix()
        if relative in SETTINGS_MODULES:
            continue
        lines = _reads_environment(ast.parse(path.read_text(), relative))
        if lines:
            offenders[relative] = lines
    assert offenders == {}, f"read os.environ outside the settings modules: {offenders}"


def test_the_checker_sees_a_read():
    assert _reads_environment(ast.parse("import os\nx = os.environ.get('A')")) == [2]
    assert _reads_environment(ast.parse("import os\nos.getenv('A')")) == [2]
