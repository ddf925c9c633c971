"""A fake n8n 2.x on a real socket: production webhooks and the public API's executions.

Tests script workflows by webhook path and then talk to it over HTTP, exactly as the worker
talks to n8n. What is copied from n8n (see ``workers/n8n/client.py`` for the sources):

- ``POST /webhook/{path}``: an unknown path answers 404 with n8n's ``code``/``message``/``hint``
  body (a registered path called with another method: the same without ``hint``, which n8n
  leaves out when empty); a workflow that fails before answering gets ``500 {"message": "Error
  in workflow"}``; an async workflow answers early (a Respond to Webhook node sending
  ``{"executionId": …}``). Every call that reaches a workflow is a new execution: n8n does not
  de-duplicate webhooks.
- Answers after a run (``add_no_item``, ``add_responding``): ``500 {"code": 0, "message": "No
  item to return was found"}`` when *When last node finishes* has nothing to send, and whatever
  status a Respond to Webhook node is configured with. Answers before any run
  (``starting_up``, ``database_not_ready``): the ``200`` text page n8n serves while it starts
  (``n8n is starting up. Please wait``) and ``503 {"code": 503, "message": "Database is not
  ready!"}``, both from ``abstract-server.ts``.
- ``GET /api/v1/executions/{id}[?includeData=true]`` with ``X-N8N-API-KEY``: 401 bodies
  ``'X-N8N-API-KEY' header required`` / ``unauthorized``, 404 ``Not Found``; the execution's
  fields as in the public API spec, and with ``includeData`` its ``data.resultData`` (``runData``
  per node, ``lastNodeExecuted``, ``error`` with ``message`` and ``node``).

Fields n8n sends that no client here reads (``stack``, ``hints``, node positions…) are
illustrative, not recorded.
"""

from __future__ import annotations

import itertools
import json
import math
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import pytest

#: The API key the fake accepts unless told otherwise.
TEST_API_KEY = "test-n8n-api-key"

#: n8n's answer to an unregistered production webhook (n8n 2.x, as quoted in its issues).
_NOT_REGISTERED_HINT = (
    "The workflow must be active for a production URL to run successfully. You can activate the "
    "workflow using the toggle in the top-right of the editor. Note that unlike test URL calls, "
    "production URL calls aren't shown on the canvas (only in the executions list)"
)

Kind = Literal["sync", "slow", "async", "failing", "stall", "no_item", "respond"]

#: What n8n serves, as text/html with status 200, for any request while it starts up.
STARTING_UP_PAGE = "n8n is starting up. Please wait"
#: n8n's answer for any request while its database is not connected.
DATABASE_NOT_READY = {"code": 503, "message": "Database is not ready!"}
#: n8n 2.x's answer when "When last node finishes" has nothing to send (1.x: "…got found").
NO_ITEM_TO_RETURN = {"code": 0, "message": "No item to return was found"}


@dataclass
class Workflow:
    """One published workflow behind a webhook path, and how it behaves."""

    path: str
    kind: Kind
    output: Any = None
    #: sync/slow: seconds before answering (the whole run); stall: seconds before dropping.
    delay_s: float = 0.0
    #: async/failing: seconds in ``new`` (queued), then in ``running``, then the end.
    queued_s: float = 0.0
    run_s: float = 0.0
    error_message: str = ""
    error_node: str = ""
    #: failing: answer ``{"executionId"}`` at once (else ``500 Error in workflow`` at the end).
    early: bool = True
    #: no_item / respond: the status, body and headers answered after the run.
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    last_node: str = "Respond to Webhook"
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12)[:16])

    @property
    def name(self) -> str:
        return f"Conveyor test {self.path}"


@dataclass(frozen=True)
class ReceivedCall:
    """One request a webhook received, as the Webhook node would see it."""

    method: str
    headers: dict[str, str]  # lower-cased names, like n8n's Webhook node output
    body: Any


@dataclass
class _Execution:
    id: str
    workflow: Workflow
    call: ReceivedCall
    created: float  # time.monotonic()
    created_at: datetime
    queued_s: float
    run_s: float  # math.inf: never ends (a stalled run)
    outcome: Literal["success", "error"]

    def status(self, now: float) -> str:
        elapsed = now - self.created
        if elapsed < self.queued_s:
            return "new"
        if elapsed < self.queued_s + self.run_s:
            return "running"
        return self.outcome


@dataclass
class _Scripted:
    status: int
    body: Any
    headers: dict[str, str]
    api: bool


class FakeN8n:
    """The fake server. Start it (or use it as a context manager), register workflows, call it.

    ``calls(path)`` counts every request that reached a webhook path, including scripted
    failures: what a test needs to prove "called exactly once". ``runs(path)`` counts the
    executions those requests started: what a test needs to prove "ran exactly once".
    """

    def __init__(self, *, api_key: str = TEST_API_KEY, host: str = "127.0.0.1"):
        self.api_key = api_key
        self._host = host
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._workflows: dict[str, Workflow] = {}
        self._executions: dict[str, _Execution] = {}
        self._received: dict[str, list[ReceivedCall]] = {}
        self._api_calls: Counter[str] = Counter()
        self._scripted: list[_Scripted] = []
        self._ids = itertools.count(1001)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> FakeN8n:
        httpd = _Server((self._host, 0), _Handler)
        httpd.fake = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.05},  # how long stop() waits for the serving loop
            name="fake-n8n",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # releases stalled and sleeping handlers
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeN8n:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL, as ``N8N_BASE_URL`` would hold it."""
        assert self._httpd is not None, "start the fake first"
        host, port = self._httpd.server_address[:2]
        assert isinstance(host, str), "an IPv4 address"
        return f"http://{host}:{port}"

    # -- scripting ------------------------------------------------------------------------------

    def add_sync(
        self, path: str, output: Any, *, delay_s: float = 0.0, last_node: str = "Respond to Webhook"
    ) -> Workflow:
        """Answers when the run ends with ``output`` (the last node's / Respond node's body)."""
        return self._add(Workflow(path, "sync", output, delay_s=delay_s, last_node=last_node))

    def add_slow(self, path: str, output: Any, *, delay_s: float) -> Workflow:
        """A synchronous workflow that takes ``delay_s`` before answering."""
        return self._add(Workflow(path, "slow", output, delay_s=delay_s))

    def add_async(
        self, path: str, output: Any, *, queued_s: float = 0.05, run_s: float = 0.2
    ) -> Workflow:
        """Answers ``{"executionId"}`` at once; then new -> running -> success with ``output``."""
        return self._add(Workflow(path, "async", output, queued_s=queued_s, run_s=run_s))

    def add_failing(
        self,
        path: str,
        *,
        message: str,
        node: str,
        early: bool = True,
        queued_s: float = 0.0,
        run_s: float = 0.1,
    ) -> Workflow:
        """Ends in status ``error`` at ``node`` with ``message``; ``early`` answers with the
        execution id first, else the caller waits and gets ``500 Error in workflow``."""
        workflow = Workflow(
            path,
            "failing",
            queued_s=queued_s,
            run_s=run_s,
            error_message=message,
            error_node=node,
            early=early,
        )
        return self._add(workflow)

    def add_stall(self, path: str, *, drop_after_s: float | None = None) -> Workflow:
        """Starts a run and never answers; with ``drop_after_s``, closes the connection then."""
        return self._add(Workflow(path, "stall", delay_s=drop_after_s or math.inf))

    def add_no_item(self, path: str, *, delay_s: float = 0.0, legacy: bool = False) -> Workflow:
        """Responds *When last node finishes*, and its last node returns no item: the run
        succeeds, then n8n answers ``500 No item to return was found`` (``legacy``: 1.x's
        ``got found``)."""
        body = dict(NO_ITEM_TO_RETURN)
        if legacy:
            body["message"] = "No item to return got found"
        workflow = Workflow(path, "no_item", [], delay_s=delay_s, status=500, body=body)
        return self._add(workflow)

    def add_responding(
        self,
        path: str,
        *,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
        delay_s: float = 0.0,
    ) -> Workflow:
        """A Respond to Webhook node configured with ``status``: the work before it runs (the
        execution is counted and succeeds), then it answers ``status`` with ``body``."""
        workflow = Workflow(
            path, "respond", body, delay_s=delay_s, status=status, body=body, headers=headers or {}
        )
        return self._add(workflow)

    def starting_up(self, count: int) -> None:
        """The next ``count`` webhook calls get the page n8n serves while it starts: ``200``,
        text/html ``n8n is starting up. Please wait``. No execution is started."""
        self.fail_next(count, status=200, body=STARTING_UP_PAGE)

    def database_not_ready(self, count: int) -> None:
        """The next ``count`` webhook calls get ``503 Database is not ready!``, as n8n answers
        any request while its database is not connected. No execution is started."""
        self.fail_next(count, status=503, body=dict(DATABASE_NOT_READY))

    def fail_next(
        self,
        count: int,
        *,
        status: int = 503,
        body: Any = None,
        headers: dict[str, str] | None = None,
        api: bool = False,
    ) -> None:
        """The next ``count`` webhook calls (or API calls, with ``api``) answer ``status``
        without reaching a workflow: no execution is started (a proxy's answer, or n8n's own
        before it looks the webhook up)."""
        if body is None:
            body = {"code": status, "message": f"scripted {status}"}
        with self._lock:
            self._scripted.extend(_Scripted(status, body, headers or {}, api) for _ in range(count))

    def finish(self, execution_id: str) -> None:
        """Ends a queued or running execution now, with its workflow's outcome: a test decides
        when a slow run ends instead of sleeping for it."""
        with self._lock:
            execution = self._executions[execution_id]
            elapsed = time.monotonic() - execution.created
            execution.queued_s = min(execution.queued_s, elapsed)
            execution.run_s = elapsed - execution.queued_s

    def _add(self, workflow: Workflow) -> Workflow:
        with self._lock:
            self._workflows[workflow.path] = workflow
        return workflow

    # -- observing ------------------------------------------------------------------------------

    def calls(self, path: str) -> int:
        """How many requests reached ``/webhook/{path}``."""
        with self._lock:
            return len(self._received.get(path, []))

    def runs(self, path: str) -> int:
        """How many executions calls to ``/webhook/{path}`` started."""
        return len(self.executions(path))

    def received(self, path: str) -> list[ReceivedCall]:
        with self._lock:
            return list(self._received.get(path, []))

    def executions(self, path: str | None = None) -> list[str]:
        """Ids of the executions started, for one webhook path or all."""
        with self._lock:
            return [e.id for e in self._executions.values() if path in (None, e.workflow.path)]

    def api_calls(self, execution_id: str) -> int:
        with self._lock:
            return self._api_calls[execution_id]

    def execution_json(self, execution_id: str, *, include_data: bool = True) -> dict[str, Any]:
        """The public API's JSON for one execution, as it stands now."""
        with self._lock:
            execution = self._executions[execution_id]
        return _execution_json(execution, time.monotonic(), include_data, self.url)

    # -- request handling (called from the server's threads) ------------------------------------

    def _webhook(self, handler: _Handler, method: str, path: str, raw: bytes) -> None:
        call = ReceivedCall(
            method=method,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=_parse_json(raw),
        )
        with self._lock:
            self._received.setdefault(path, []).append(call)
            scripted = self._pop_scripted(api=False)
            workflow = self._workflows.get(path)
        if scripted is not None:
            handler.send(scripted.status, scripted.body, scripted.headers)
            return
        if workflow is None:
            message = f'The requested webhook "{method} {path}" is not registered.'
            handler.send(404, {"code": 404, "message": message, "hint": _NOT_REGISTERED_HINT})
            return
        if method != "POST":
            message = (
                f"This webhook is not registered for {method} requests. "
                "Did you mean to make a POST request?"
            )
            handler.send(404, {"code": 404, "message": message})  # an empty hint is left out
            return

        kind = workflow.kind
        if kind in ("sync", "slow"):
            self._start(workflow, call, queued_s=0.0, run_s=workflow.delay_s, outcome="success")
            if self._stopping.wait(workflow.delay_s):
                return
            handler.send(200, workflow.output)
        elif kind == "async":
            execution = self._start(
                workflow, call, queued_s=workflow.queued_s, run_s=workflow.run_s, outcome="success"
            )
            handler.send(200, {"executionId": execution.id})
        elif kind == "failing":
            execution = self._start(
                workflow, call, queued_s=workflow.queued_s, run_s=workflow.run_s, outcome="error"
            )
            if workflow.early:
                handler.send(200, {"executionId": execution.id})
            elif not self._stopping.wait(workflow.queued_s + workflow.run_s):
                handler.send(500, {"message": "Error in workflow"})
        elif kind in ("no_item", "respond"):  # the run happens, then an error status
            self._start(workflow, call, queued_s=0.0, run_s=workflow.delay_s, outcome="success")
            if self._stopping.wait(workflow.delay_s):
                return
            handler.send(workflow.status, workflow.body, workflow.headers)
        else:  # stall: the run started, the answer never comes
            self._start(workflow, call, queued_s=0.0, run_s=math.inf, outcome="success")
            self._stopping.wait(None if math.isinf(workflow.delay_s) else workflow.delay_s)
            handler.close_connection = True

    def _api(self, handler: _Handler, method: str, path: str, query: dict[str, list[str]]) -> None:
        with self._lock:
            scripted = self._pop_scripted(api=True)
        if scripted is not None:
            handler.send(scripted.status, scripted.body, scripted.headers)
            return
        key = handler.headers.get("X-N8N-API-KEY")
        if not key:
            handler.send(401, {"message": "'X-N8N-API-KEY' header required"})
            return
        if key != self.api_key:
            handler.send(401, {"message": "unauthorized"})
            return
        parts = path.strip("/").split("/")  # api, v1, executions, {id}
        if method != "GET" or len(parts) != 4 or parts[2] != "executions":
            handler.send(404, {"message": "not found"})
            return
        with self._lock:
            self._api_calls[parts[3]] += 1
            execution = self._executions.get(parts[3])
        if execution is None:
            handler.send(404, {"message": "Not Found"})
            return
        include = query.get("includeData", ["false"])[-1] == "true"
        handler.send(200, _execution_json(execution, time.monotonic(), include, self.url))

    def _start(
        self,
        workflow: Workflow,
        call: ReceivedCall,
        *,
        queued_s: float,
        run_s: float,
        outcome: Literal["success", "error"],
    ) -> _Execution:
        with self._lock:
            execution = _Execution(
                id=str(next(self._ids)),
                workflow=workflow,
                call=call,
                created=time.monotonic(),
                created_at=datetime.now(UTC),
                queued_s=queued_s,
                run_s=run_s,
                outcome=outcome,
            )
            self._executions[execution.id] = execution
        return execution

    def _pop_scripted(self, *, api: bool) -> _Scripted | None:
        for i, scripted in enumerate(self._scripted):
            if scripted.api == api:
                return self._scripted.pop(i)
        return None


@pytest.fixture
def n8n_server() -> Iterator[FakeN8n]:
    """A fresh fake n8n per test, stopped afterwards."""
    with FakeN8n() as server:
        yield server


# -- the HTTP side --------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeN8n


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like n8n's Express server
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass  # tests read assertions, not access logs

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        url = urlsplit(self.path)
        fake = self.server.fake
        if url.path.startswith("/webhook/"):
            fake._webhook(self, method, url.path.removeprefix("/webhook/"), raw)
        elif url.path.startswith("/api/v1/"):
            fake._api(self, method, url.path, parse_qs(url.query))
        else:  # Express's own 404
            self.send(404, f"Cannot {method} {url.path}", content_type="text/html; charset=utf-8")

    def send(
        self,
        status: int,
        body: Any,
        headers: dict[str, str] | None = None,
        *,
        content_type: str = "application/json; charset=utf-8",
    ) -> None:
        if isinstance(body, str | bytes) and content_type.startswith("application/json"):
            content_type = "text/html; charset=utf-8"
        payload = (
            body
            if isinstance(body, bytes)
            else (body.encode() if isinstance(body, str) else json.dumps(body).encode())
        )
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client gave up first (a read timeout)


# -- n8n's execution JSON -------------------------------------------------------------------------


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _parse_json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _items(output: Any) -> list[dict[str, Any]]:
    values = output if isinstance(output, list) else [output]
    return [{"json": v, "pairedItem": {"item": i}} for i, v in enumerate(values)]


def _execution_json(
    execution: _Execution, now: float, include_data: bool, base_url: str
) -> dict[str, Any]:
    """One execution in the public API's shape (``getExecution``'s 200 schema)."""
    workflow = execution.workflow
    status = execution.status(now)
    started = execution.created_at + timedelta(seconds=execution.queued_s)
    ended = status in ("success", "error")
    doc: dict[str, Any] = {
        "id": execution.id,
        "finished": status == "success",
        "mode": "webhook",
        "retryOf": None,
        "retrySuccessId": None,
        "status": status,
        "createdAt": _iso(execution.created_at),
        "startedAt": None if status == "new" else _iso(started),
        "stoppedAt": (_iso(started + timedelta(seconds=execution.run_s)) if ended else None),
        "deletedAt": None,
        "workflowId": workflow.id,
        "waitTill": None,
        "storedAt": "db",
    }
    if include_data:
        doc["data"] = _run_execution_data(execution, status, started, base_url)
        doc["workflowData"] = _workflow_data(workflow)
        doc["customData"] = {}
    return doc


def _run_execution_data(
    execution: _Execution, status: str, started: datetime, base_url: str
) -> dict[str, Any]:
    """``IRunExecutionData``: ``resultData.runData`` per node, ``lastNodeExecuted``, ``error``."""
    workflow = execution.workflow
    if status == "new":
        return {"startData": {}, "resultData": {"runData": {}}, "executionData": _pending()}
    webhook_output = {
        "headers": execution.call.headers,
        "params": {},
        "query": {},
        "body": execution.call.body,
        "webhookUrl": f"{base_url}/webhook/{workflow.path}",
        "executionMode": "production",
    }
    run_data: dict[str, list[dict[str, Any]]] = {
        "Webhook": [_task(started, 0, [], {"main": [_items(webhook_output)]})]
    }
    result: dict[str, Any] = {"runData": run_data, "lastNodeExecuted": "Webhook"}
    if status == "success":
        run_data[workflow.last_node] = [
            _task(started, 1, [{"previousNode": "Webhook"}], {"main": [_items(workflow.output)]})
        ]
        result["lastNodeExecuted"] = workflow.last_node
    elif status == "error":
        error = _node_error(workflow, started)
        task = _task(started, 1, [{"previousNode": "Webhook"}], None)
        task["executionStatus"] = "error"
        task["error"] = error
        run_data[workflow.error_node] = [task]
        result["lastNodeExecuted"] = workflow.error_node
        result["error"] = error
    data: dict[str, Any] = {"startData": {}, "resultData": result}
    if status == "running":
        data["executionData"] = _pending()
    return data


def _task(
    started: datetime, index: int, source: list[dict[str, str]], data: dict[str, Any] | None
) -> dict[str, Any]:
    task: dict[str, Any] = {
        "hints": [],
        "startTime": _ms(started) + index,
        "executionIndex": index,
        "executionTime": 1,
        "executionStatus": "success",
        "source": source,
    }
    if data is not None:
        task["data"] = data
    return task


def _node_error(workflow: Workflow, started: datetime) -> dict[str, Any]:
    """A ``NodeOperationError`` as n8n stores it: its own fields, plus message and stack."""
    return {
        "level": "warning",
        "tags": {},
        "description": None,
        "context": {},
        "functionality": "regular",
        "name": "NodeOperationError",
        "timestamp": _ms(started),
        "node": {
            "parameters": {},
            "id": f"node-{workflow.id}",
            "name": workflow.error_node,
            "type": "n8n-nodes-base.code",
            "typeVersion": 2,
            "position": [440, 0],
        },
        "messages": [],
        "message": workflow.error_message,
        "stack": f"NodeOperationError: {workflow.error_message}\n    at fake-n8n",
    }


def _pending() -> dict[str, Any]:
    return {
        "contextData": {},
        "nodeExecutionStack": [],
        "metadata": {},
        "waitingExecution": {},
        "waitingExecutionSource": {},
    }


def _workflow_data(workflow: Workflow) -> dict[str, Any]:
    last = workflow.error_node if workflow.kind == "failing" else workflow.last_node
    return {
        "id": workflow.id,
        "name": workflow.name,
        "active": True,
        "nodes": [
            {
                "name": "Webhook",
                "type": "n8n-nodes-base.webhook",
                "typeVersion": 2,
                "parameters": {"httpMethod": "POST", "path": workflow.path},
            },
            {"name": last, "type": "n8n-nodes-base.code", "typeVersion": 2, "parameters": {}},
        ],
        "connections": {"Webhook": {"main": [[{"node": last, "type": "main", "index": 0}]]}},
        "settings": {"executionOrder": "v1"},
    }
