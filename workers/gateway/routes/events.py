"""A job's events over server-sent events, and many jobs' over one WebSocket (see
``workers.gateway.streams`` for how each event reaches a client once, in order)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import Response, StreamingResponse
from redis.exceptions import RedisError
from starlette.concurrency import run_in_threadpool

from conveyor.envelopes import TERMINAL_TYPES
from conveyor.jobstatus import FINISHED, status_of
from conveyor.streams import gap
from workers.gateway.access import gateway_of, owned_job
from workers.gateway.auth import Caller, presented_key
from workers.gateway.openapi import refusals
from workers.gateway.responses import ApiError
from workers.gateway.state import Gateway
from workers.gateway.streams import COMPONENTS, Feed

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1", tags=["events"])


def _caller(gw: Gateway, headers: Any, job_id: str | None, token: str | None, key: str | None):
    if token and not presented_key(headers, key):
        if job_id is None:
            raise ApiError(401, "a token follows one job: subscribe to it in the URL's job_id")
        return gw.tokens.verify(token, job_id)
    return gw.keys.caller(presented_key(headers, key))


def _after_seq(last_event_id: str | None, from_seq: int | None) -> int:
    if last_event_id is not None and last_event_id.strip():
        text = last_event_id.strip()
        if not text.isascii() or not text.isdigit() or len(text) > 18:
            raise ApiError(
                400,
                "Last-Event-ID must be the seq of an event (a whole number)",
                problems=["header: Last-Event-ID: a whole number"],
            )
        return int(text)
    return from_seq or 0


def _sse(item: dict[str, Any]) -> str:
    data = json.dumps(item, separators=(",", ":"))
    if item.get("control") == "gap":
        return f"event: gap\ndata: {data}\n\n"
    return f"id: {item['seq']}\ndata: {data}\n\n"


@router.get(
    "/jobs/{job_id}/events",
    summary="The job's events as server-sent events: replay, then live, until it ends",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the event stream"},
        204: {"description": "the job ended before Last-Event-ID: nothing more will come"},
        **refusals(
            400,
            (401, "no or unknown API key, or a token not valid or expired"),
            (403, "the token is for another job"),
            404,
            503,
        ),
    },
)
async def job_events(
    request: Request,
    job_id: str,
    token: str | None = Query(None, description="a job token instead of an API key"),
    from_seq: int | None = Query(None, ge=0, le=10**15),
    last_event_id: str | None = Header(None),
) -> Response:
    gw = gateway_of(request)
    caller = _caller(gw, request.headers, job_id, token, None)
    await owned_job(gw, caller, job_id)
    after = _after_seq(last_event_id, from_seq)
    feed = Feed(gw.hub, caller.tenant, gw.spec.client_buffer, refill=True)
    try:
        first = await feed.follow(job_id, after)
        if not first:
            ended = await _ended(gw, job_id, after)
            if ended is not None:
                await feed.close()
                if not ended:
                    return Response(status_code=204)
                first = ended
    except BaseException:
        await _close(feed)  # a failure here must not leave the subscription behind
        raise
    return StreamingResponse(
        _stream(feed, job_id, first, gw.spec.keepalive_s),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _ended(gw: Gateway, job_id: str, after: int) -> list[dict[str, Any]] | None:
    """For a job with nothing to send after ``after``: None while it may still send some;
    else what to send before closing — nothing (204: a reconnect after its end), or one gap
    marker when its events have expired from Redis and the caller saw none of them."""
    history = await gw.hub.history(job_id)
    if any(e.get("type") in TERMINAL_TYPES for e in history):
        return []
    if history:
        return None
    [meta] = await run_in_threadpool(gw.submitter.states, [job_id])
    if status_of(meta) not in FINISHED:
        return None
    return [] if after > 0 else [gap(job_id, 1, None)]


async def _stream(
    feed: Feed, job_id: str, first: list[dict[str, Any]], keepalive_s: float
) -> AsyncIterator[str]:
    try:
        yield "retry: 2000\n\n"
        for item in first:
            yield _sse(item)
        while job_id in feed.followers:
            try:
                items = await feed.next(keepalive_s)
            except (OSError, RedisError) as exc:
                # Redis went away: end the stream; the client reconnects (EventSource does,
                # after `retry`) with Last-Event-ID and misses nothing.
                log.warning("event stream of job %s ended early: %s", job_id, exc)
                return
            if items is None:
                yield ": keep-alive\n\n"
                continue
            for item in items:
                yield _sse(item)
    finally:
        await _close(feed)


@router.websocket("/ws")
async def events_socket(
    websocket: WebSocket,
    token: str | None = Query(None),
    job_id: str | None = Query(None),
) -> None:
    """One connection, many jobs and components; the protocol is in docs/gateway.md."""
    gw: Gateway = websocket.app.state.gateway
    try:
        caller = _caller(gw, websocket.headers, job_id, token, None)
    except ApiError as exc:
        await websocket.close(code=4401 if exc.status == 401 else 4403, reason=exc.message)
        return
    await websocket.accept()
    feed = Feed(gw.hub, caller.tenant, gw.spec.client_buffer)
    lock = asyncio.Lock()

    async def send(items: list[dict[str, Any]]) -> None:
        async with lock:
            for item in items:
                await websocket.send_text(json.dumps(item, separators=(",", ":")))

    async def pump() -> None:
        while True:
            try:
                items = await feed.next(gw.spec.keepalive_s)
            except (OSError, RedisError) as exc:  # Redis away: the feed catches up later
                log.warning("websocket feed: %s", exc)
                await asyncio.sleep(1.0)
                continue
            if items:
                await send(items)

    pumping = asyncio.create_task(pump())
    try:
        while True:
            try:
                message = await websocket.receive_json()
            except (ValueError, KeyError):
                await send([_problem('send JSON objects: {"op": "subscribe", ...}')])
                continue
            try:
                answer = await _handle(gw, caller, feed, message)
            except (OSError, RedisError):
                answer = [_problem("Redis is unreachable; subscribe again in a moment")]
            await send(answer)
    except WebSocketDisconnect:
        pass
    finally:
        pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await pumping
        await _close(feed)


async def _close(feed: Feed) -> None:
    """Unsubscribe a gone client's feed. Shielded: a disconnect cancels the connection's scope,
    and in a cancelled scope every await would fail at once, leaving the subscriptions (and
    the hub's memory of them) behind for good."""
    with anyio.CancelScope(shield=True), contextlib.suppress(OSError, RedisError):
        await feed.close()


def _problem(error: str) -> dict[str, Any]:
    return {"control": "problem", "error": error}


async def _handle(gw: Gateway, caller: Caller, feed: Feed, message: Any) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        return [_problem("a message must be a JSON object")]
    op = message.get("op")
    job_id = message.get("job_id")
    component = message.get("component")
    if op == "subscribe" and isinstance(job_id, str):
        from_seq = message.get("from_seq", 0)
        if not isinstance(from_seq, int) or isinstance(from_seq, bool) or from_seq < 0:
            return [_problem("from_seq must be a whole number >= 0")]
        try:
            await owned_job(gw, caller, job_id)
        except ApiError as exc:
            return [_problem(exc.message)]
        if job_id in feed.followers:
            return [_problem(f"already subscribed to {job_id}")]
        replay = await feed.follow(job_id, from_seq)
        return [{"control": "subscribed", "job_id": job_id}, *replay]
    if op == "subscribe" and isinstance(component, str):
        if caller.job_scope is not None:
            return [_problem("a job token follows its one job, not a component")]
        if component != "*" and component not in COMPONENTS:
            known = ", ".join(sorted(COMPONENTS))
            return [_problem(f"component must be one of {known} or *")]
        await feed.watch_component(component)
        return [{"control": "subscribed", "component": component}]
    if op == "unsubscribe" and isinstance(job_id, str):
        await feed.unfollow(job_id)
        return [{"control": "unsubscribed", "job_id": job_id}]
    return [_problem('expected {"op": "subscribe"|"unsubscribe", "job_id"|"component": ...}')]
