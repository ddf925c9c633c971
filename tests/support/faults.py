"""What each fault test saw, printed as one table at the end of the run (`pytest -m faults`)."""

from __future__ import annotations

from dataclasses import dataclass

#: Every fault test's counts, in the order they ran.
RESULTS: list[FaultCounts] = []


@dataclass(frozen=True)
class FaultCounts:
    test: str
    submitted: int
    completed: int
    lost: int
    duplicated: int
    dead_lettered: int
    note: str = ""


def report(test: str, **counts: int | str) -> FaultCounts:
    """Record one fault test's counts; returns them for the test's own assertions."""
    result = FaultCounts(test=test, **counts)  # type: ignore[arg-type]
    RESULTS.append(result)
    return result


def table() -> list[str]:
    header = (
        f"{'fault test':<58} {'submitted':>9} {'completed':>9} {'lost':>5} {'dup':>4} {'dead':>5}"
    )
    lines = [header]
    for r in RESULTS:
        lines.append(
            f"{r.test:<58} {r.submitted:>9} {r.completed:>9} {r.lost:>5} {r.duplicated:>4} "
            f"{r.dead_lettered:>5}  {r.note}"
        )
    return lines
