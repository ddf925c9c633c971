"""``conveyor``: the one command for operators and for services without Python."""

from workers.cli.main import main

__all__ = ["main"]
