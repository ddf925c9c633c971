"""The HTTP gateway: Conveyor for services in any language and for browsers.

``app.py`` builds the ASGI app (FastAPI on uvicorn, ``conveyor gateway``); ``auth.py`` says who
is calling (API keys bound to tenants, job tokens); ``streams.py`` follows jobs' events for
server-sent events and WebSocket clients; ``routes/`` holds one module per resource. The
contract is ``docs/gateway.md``.
"""
