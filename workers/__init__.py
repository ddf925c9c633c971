"""The worker runtime: the Celery app, pools, clients for the outside world, storage, events."""
