"""The peers ``bench.compare`` measures Conveyor against, each a tiny app of its own.

Every app reads the one Redis it may use from ``BENCH_REDIS_URL`` (the harness's embedded
Valkey) and has the same two tasks: a no-op (the drain) and one that records ``time.time()``
when it starts (submit -> start latency, ``stamps``).
"""
