"""Conveyor's client library: what a submitting service imports.

It holds the public contract — task names, payload schemas, envelopes, Redis key names — and
the submitter. It never imports ``tasks`` or ``workers``.
"""

from conveyor.errors import ConveyorError, JobFailed, PayloadError, UnknownTaskError
from conveyor.names import QUEUES, TASK_QUEUES
from conveyor.submitter import Job, Submitter

__all__ = [
    "QUEUES",
    "TASK_QUEUES",
    "ConveyorError",
    "Job",
    "JobFailed",
    "PayloadError",
    "Submitter",
    "UnknownTaskError",
]
