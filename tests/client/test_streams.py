"""``conveyor.streams.Follower``: whatever order and however often events arrive (a replay and
a live channel overlap, a channel loses some), each is delivered once, in seq order, with a
gap marker exactly where the stream no longer holds them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from conveyor.streams import Follower


def _event(seq: int, last: int) -> dict:
    return {"job_id": "j", "seq": seq, "type": "complete" if seq == last else "update"}


@given(
    total=st.integers(min_value=1, max_value=40),
    after=st.integers(min_value=0, max_value=45),
    live_order=st.randoms(use_true_random=False),
    lost=st.sets(st.integers(min_value=1, max_value=40)),
    trimmed=st.integers(min_value=0, max_value=40),
    replay_at=st.integers(min_value=0, max_value=80),
)
def test_each_event_once_in_order_with_a_gap_only_for_what_was_trimmed(
    total, after, live_order, lost, trimmed, replay_at
):
    events = [_event(seq, total) for seq in range(1, total + 1)]
    trimmed = min(trimmed, total - 1)  # the stream always keeps its newest event
    stream = events[trimmed:]
    live = [e for e in events if e["seq"] not in lost] * 2  # duplicates on the channel too
    live_order.shuffle(live)

    follower = Follower("j", after)
    delivered: list[dict] = []
    for n, event in enumerate(live):
        if n == replay_at:
            delivered += follower.replay(stream)
        delivered += follower.live(event)
        if follower.missing:
            delivered += follower.replay(stream)
    delivered += follower.replay(stream)  # the quiet-spell catch-up

    seqs = [d["seq"] for d in delivered if "seq" in d]
    gaps = [d for d in delivered if d.get("control") == "gap"]
    assert seqs == sorted(set(seqs)), "out of order or twice"
    if after >= total:
        assert delivered == []
        return
    # Everything after `after` is accounted for exactly once: delivered, or inside a gap.
    covered = set(seqs)
    for g in gaps:
        covered |= set(range(g["from_seq"], g["to_seq"] + 1))
        assert g["to_seq"] <= trimmed, "a gap over events the stream still holds"
    assert covered == set(range(after + 1, total + 1))
    assert follower.ended and seqs[-1] == total


def test_skip_marks_a_gap_for_what_a_slow_reader_dropped():
    follower = Follower("j", 0)
    assert follower.live(_event(1, 9)) == [_event(1, 9)]
    assert follower.live(_event(5, 9)) == []  # 2-4 dropped for a slow reader
    out = follower.skip(4)
    assert out[0] == {"control": "gap", "job_id": "j", "from_seq": 2, "to_seq": 4}
    assert out[1:] == [_event(5, 9)]


def test_a_follower_starting_past_the_end_ends_at_the_terminal_event():
    """``from_seq`` beyond a job's last event: nothing to deliver, and it must not wait for
    events that will never come."""
    follower = Follower("j", 50)
    assert follower.replay([_event(seq, 5) for seq in range(1, 6)]) == []
    assert follower.ended
    live = Follower("j", 50)
    assert live.live(_event(5, 5)) == [] and live.ended
