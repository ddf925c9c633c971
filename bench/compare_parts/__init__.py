"""The parts of ``bench.compare`` (``make bench``), one concept a module:

- ``server``: the harness's own embedded Valkey, and what Redis did (commands, round trips);
- ``procs``: processes started in their own group, stopped by id; CPU of a process tree;
- ``systems``: Conveyor and its baselines: how each worker starts, where its queue lives;
- ``producer``: jobs sent from one process (enqueue rate, pre-loading, open-loop latency);
- ``drain``: a pre-loaded queue emptied by a freshly started worker;
- ``latency``: submit -> start at a fixed offered rate;
- ``slots``: the figures of ``bench.episodes`` and ``bench.ai_inflight``, run small;
- ``profile``: where a worker's CPU goes (py-spy), when asked;
- ``report`` and ``plot``: the table, its files, and the PNG.
"""
