"""Errors a submitting service can catch."""

from __future__ import annotations


class ConveyorError(Exception):
    """Base of every error Conveyor raises to a caller."""


class UnknownTaskError(ConveyorError, KeyError):
    """The task name is not one of Conveyor's public tasks."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class PayloadError(ConveyorError, ValueError):
    """A payload does not fit its task's schema; ``problems`` lists each bad field."""

    def __init__(self, task: str, problems: list[str]):
        self.task = task
        self.problems = problems
        super().__init__(f"invalid payload for {task}: " + "; ".join(problems))


class IdempotencyConflict(ConveyorError, ValueError):
    """An idempotency key already used, within its window, for a different payload: the
    earlier job is not returned for an ask that is not the same one."""


class IdempotencyKeyInFlight(ConveyorError):
    """The first request with this idempotency key is still being sent: retry shortly (the
    IETF draft's 409). Its job may or may not come to exist, so no job is returned."""


class JobFailed(ConveyorError):
    """Raised by ``Job.result(raise_on_failure=True)`` when the job ended in failure."""


class ConfigError(ConveyorError, ValueError):
    """An environment variable is set to something Conveyor cannot use; the message names it
    (and never shows a secret's value)."""
