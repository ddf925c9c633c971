"""A minimal valid payload for every public task: the routing and contract tests use them."""

VALID = {
    "ai.generate": {"prompt": "Say hi"},
    "ai.chat": {"messages": [{"role": "user", "content": "hi"}]},
    "ai.code": {"instruction": "write fizzbuzz", "language": "python"},
    "ai.analyze": {"text": "I love it", "kind": "sentiment"},
    "episodes.record": {"user_id": "u1", "model_type": "gpt", "prompt": "p", "response": "r"},
    "n8n.execute": {"workflow": "my-hook", "data": {"n": 2}, "mode": "sync"},
    "maintenance.ping": {},
    "maintenance.queue_metrics": {},
    "maintenance.flush_dead_letters": {},
    "maintenance.reconcile_workflows": {},
    "maintenance.episode_retention": {},
}
