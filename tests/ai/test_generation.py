"""workers/ai/generation.py over the built-in ``local`` echo provider and the suite's real
Redis (breakers, rate limits and cancel keys live there): streamed progress coalesced to a
bounded rate, the provider chain and its fallbacks, and cancellation through CancelWatch."""

from __future__ import annotations

import threading
import time

import pytest

from conveyor import keys
from tests.support.waiting import wait_for
from workers.ai.generation import CancelWatch, Generation, Generator, ProgressCoalescer
from workers.ai.providers import Cancelled, DeadlineExceeded, ProviderConfig
from workers.failures import Deferred, Permanent, Retryable
from workers.resilience.breakers import CircuitOpen
from workers.resilience.ratelimit import RateLimited

LOCAL = ProviderConfig(name="local", kind="local", default_model="local-echo")

WORDS = "one two three four five six seven eight nine ten eleven twelve"
MESSAGES = [
    {"role": "system", "content": "ignored by the echo"},
    {"role": "user", "content": WORDS},
]
#: The echo's answer: its label, then the last user message's words reversed.
ANSWER = "[local echo, not a model] " + " ".join(reversed(WORDS.split()))
ANSWER_WORDS = len(ANSWER.split())  # 17 words, one a chunk, ~20 ms apart


def local(name: str, **options) -> ProviderConfig:
    """Another provider of kind ``local``, under a name of the test's own (its breaker and
    rate limit in Redis are then the test's own too)."""
    return ProviderConfig(name=name, kind="local", default_model="local-echo", **options)


def generator(redis_client, providers, default=None, **options) -> Generator:
    settings = {
        "breaker_fail_max": 3,
        "breaker_reset_s": 30.0,
        "rate_wait_s": 0.0,
        "progress_interval_s": 0.1,
        **options,
    }
    configs = {config.name: config for config in providers}
    return Generator(configs, default or providers[0].name, redis_client, **settings)


class Progress:
    """Records ``on_progress`` calls with the time each came."""

    def __init__(self):
        self.pieces: list[dict] = []
        self.times: list[float] = []

    def __call__(self, piece: dict) -> None:
        self.pieces.append(piece)
        self.times.append(time.monotonic())

    @property
    def text(self) -> str:
        return "".join(p["delta"] for p in self.pieces)

    def offsets_are_cumulative(self) -> bool:
        offset = 0
        for piece in self.pieces:
            if piece["offset"] != offset:
                return False
            offset += len(piece["delta"])
        return True


# --- a run ---------------------------------------------------------------------------------------


def test_a_run_streams_coalesced_progress_and_returns_the_generation(redis_client):
    gen = generator(redis_client, [LOCAL], progress_interval_s=0.1)
    progress = Progress()

    result = gen.run(MESSAGES, on_progress=progress)

    assert isinstance(result, Generation)
    assert result.provider == "local"
    assert result.completion.model == "local-echo"
    assert result.completion.content == ANSWER
    assert result.completion.finish_reason == "stop"
    # Everything streamed arrives, in order, with offsets into the answer ...
    assert progress.text == ANSWER
    assert progress.offsets_are_cumulative()
    assert set(progress.pieces[0]) == {"delta", "offset"}
    # ... coalesced: fewer pieces than words, yet more than one over a ~0.3 s stream ...
    assert 2 <= len(progress.pieces) < ANSWER_WORDS
    # ... and never two within the interval (the final flush at the end aside).
    gaps = [b - a for a, b in zip(progress.times, progress.times[1:-1], strict=False)]
    assert all(gap >= 0.09 for gap in gaps), gaps


def test_without_an_interval_every_piece_is_its_own_progress(redis_client):
    gen = generator(redis_client, [LOCAL], progress_interval_s=0.0)
    progress = Progress()
    gen.run(MESSAGES, on_progress=progress)
    assert len(progress.pieces) == ANSWER_WORDS
    assert [p["delta"].strip() for p in progress.pieces] == ANSWER.split()
    assert progress.offsets_are_cumulative()


def test_a_long_interval_gives_one_progress_with_the_whole_answer(redis_client):
    gen = generator(redis_client, [LOCAL], progress_interval_s=60.0)
    progress = Progress()
    gen.run(MESSAGES, on_progress=progress)
    assert progress.pieces == [{"delta": ANSWER, "offset": 0}]


def test_max_tokens_reaches_the_provider(redis_client):
    gen = generator(redis_client, [LOCAL])
    result = gen.run(MESSAGES, provider="local", max_tokens=3)
    assert result.completion.content.split() == ["[local", "echo,", "not"]
    assert result.completion.finish_reason == "length"


def test_a_run_charges_the_providers_rate_limit(redis_client, unique):
    name = f"limited-{unique}"
    gen = generator(redis_client, [local(name, rpm=1)], rate_wait_s=0.0)
    gen.run(MESSAGES, max_tokens=1)
    with pytest.raises(RateLimited) as caught:
        gen.run(MESSAGES, max_tokens=1)
    assert isinstance(caught.value, Deferred)  # back to the queue, no retry spent
    assert 0 < caught.value.delay_s <= 60


# --- the provider chain --------------------------------------------------------------------------


def test_an_unknown_provider_is_permanent_and_names_the_known_ones(redis_client, unique):
    gen = generator(redis_client, [LOCAL, local(f"zeta-{unique}"), local(f"alpha-{unique}")])
    known = f"alpha-{unique}, local, zeta-{unique}"
    with pytest.raises(Permanent) as caught:
        gen.run(MESSAGES, provider="nope")
    assert str(caught.value) == f"unknown provider 'nope'; configured providers: {known}"
    with pytest.raises(Permanent, match="'nope'"):
        gen.chain("nope")
    # An unknown default is refused alike.
    broken = generator(redis_client, [LOCAL], default="missing")
    with pytest.raises(Permanent, match="unknown provider 'missing'; configured providers: local"):
        broken.chain(None)


def test_chain_is_the_provider_then_its_own_fallbacks_each_once(redis_client):
    gen = generator(
        redis_client,
        [
            local("primary", fallbacks=("second", "not-configured", "primary", "third", "second")),
            local("second", fallbacks=("fourth",)),
            local("third"),
            local("fourth"),
        ],
        default="second",
    )
    assert gen.chain("primary") == ["primary", "second", "third"]
    assert gen.chain(None) == ["second", "fourth"]  # the default's chain
    assert gen.chain("") == ["second", "fourth"]
    assert gen.chain("third") == ["third"]


def test_a_failing_provider_raises_and_its_open_circuit_sends_jobs_to_the_fallback(
    redis_client, unique
):
    primary, backup = f"primary-{unique}", f"backup-{unique}"
    gen = generator(
        redis_client,
        [local(primary, fallbacks=(backup,)), local(backup)],
        breaker_fail_max=1,
        breaker_reset_s=30.0,
    )

    # A failure is the job's to retry: no fallback for it, but it counts against the circuit.
    with pytest.raises(DeadlineExceeded):
        gen.run(MESSAGES, provider=primary, deadline=time.monotonic() + 0.05)
    assert gen.breaker(primary).snapshot().state == "open"

    progress = Progress()
    result = gen.run(MESSAGES, provider=primary, on_progress=progress)
    assert result.provider == backup
    assert result.completion.content == ANSWER
    assert progress.text == ANSWER
    assert gen.breaker(backup).snapshot().state == "closed"
    assert gen.breaker(primary).snapshot().state == "open"  # nobody probed it

    # With every circuit of the chain open the job is deferred, not failed.
    with pytest.raises(Retryable), gen.breaker(backup).guard():
        raise Retryable("backup down too")
    with pytest.raises(CircuitOpen) as caught:
        gen.run(MESSAGES, provider=primary)
    assert isinstance(caught.value, Deferred)
    assert 0 < caught.value.delay_s <= 30


def test_a_cancelled_run_does_not_count_against_the_circuit(redis_client, unique):
    name = f"cancelled-{unique}"
    gen = generator(redis_client, [local(name)], breaker_fail_max=1)
    progress = Progress()
    with pytest.raises(Cancelled):
        gen.run(MESSAGES, should_stop=lambda: True, on_progress=progress)
    assert progress.pieces == []
    assert gen.breaker(name).snapshot().state == "closed"
    assert gen.run(MESSAGES).provider == name


# --- ProgressCoalescer with a clock of the test's own -------------------------------------------


def test_the_coalescer_emits_at_most_once_per_interval():
    now = [0.0]
    emitted: list[dict] = []
    coalescer = ProgressCoalescer(emitted.append, 1.0, clock=lambda: now[0])

    coalescer.add("a")
    coalescer.add("b")
    now[0] = 0.99
    coalescer.add("c")
    assert emitted == []
    now[0] = 1.0
    coalescer.add("d")
    assert emitted == [{"delta": "abcd", "offset": 0}]
    now[0] = 1.5
    coalescer.add("e")
    coalescer.add("")  # nothing new is nothing to emit
    now[0] = 2.5
    coalescer.add("")  # ... but a due interval still sends what waits
    assert emitted[-1] == {"delta": "e", "offset": 4}
    coalescer.flush()
    coalescer.flush()
    assert len(emitted) == coalescer.emitted == 2


# --- CancelWatch ---------------------------------------------------------------------------------


def test_cancel_watch_notices_a_cancel_key_in_redis(redis_client, unique):
    watch = CancelWatch(lambda: redis_client, every_s=60.0)  # its thread stays asleep: check()
    job, other = f"job-{unique}", f"other-{unique}"
    with watch.watching(job) as should_stop, watch.watching(other) as other_stop:
        watch.check()
        assert not should_stop() and not other_stop()

        redis_client.set(keys.cancel(job), "1", ex=60)
        watch.check()
        assert should_stop()
        assert not other_stop()  # only the job asked to stop

        redis_client.delete(keys.cancel(job))
        watch.check()
        assert should_stop()  # a stop once noticed stays
    assert not should_stop()  # out of the block the job is no longer watched


def test_cancel_watch_thread_notices_within_its_interval(redis_client, unique):
    watch = CancelWatch(lambda: redis_client, every_s=0.02)
    job = f"job-{unique}"
    with watch.watching(job) as should_stop:
        time.sleep(0.1)
        assert not should_stop()
        redis_client.set(keys.cancel(job), "1", ex=60)
        wait_for(should_stop, timeout=2, interval=0.01, what="the watch seeing the cancel key")


def test_a_cancel_key_stops_a_streaming_generation(redis_client, unique):
    job = f"job-{unique}"
    gen = generator(redis_client, [local(f"stream-{unique}")], progress_interval_s=0.0)
    watch = CancelWatch(lambda: redis_client, every_s=0.02)
    progress = Progress()
    outcome: list[BaseException | Generation] = []

    def run(should_stop) -> None:
        try:
            outcome.append(gen.run(MESSAGES, should_stop=should_stop, on_progress=progress))
        except BaseException as exc:
            outcome.append(exc)

    with watch.watching(job) as should_stop:
        thread = threading.Thread(target=run, args=(should_stop,))
        thread.start()
        wait_for(lambda: len(progress.pieces) >= 2, timeout=2, interval=0.005, what="a start")
        redis_client.set(keys.cancel(job), "1", ex=60)
        thread.join(timeout=5)

    assert not thread.is_alive()
    [result] = outcome
    assert isinstance(result, Cancelled), result
    assert 2 <= len(progress.pieces) < ANSWER_WORDS  # it stopped mid-stream
