"""The n8n client: trigger a published workflow's production webhook, then follow its execution.

Plain Python with no Celery in it, so ``tasks/`` stays a thin adapter and this is tested against a
real HTTP server (``tests/fakes/n8n_server.py``). What n8n 2.x does, as read in its sources
(``packages/cli/src/webhooks/webhook-helpers.ts``, the public API's ``getExecution`` spec,
``packages/workflow/src/execution-status.ts``, ``IRunExecutionData`` in ``n8n-workflow``):

- n8n has no public "run workflow by id" endpoint, so a run starts with ``POST /webhook/{path}``.
  The Webhook node decides the answer: *Immediately* sends ``{"message": "Workflow was started"}``
  (no execution id), *When last node finishes* sends the last node's first item, *Using 'Respond
  to Webhook' node* sends whatever that node is given — for an async workflow, by our convention,
  ``{"executionId": "{{ $execution.id }}"}``.
- A workflow that fails before answering gets ``500 {"message": "Error in workflow"}``: it *ran*.
  n8n answers other 5xx *after* a run too: ``500 {"code": 0, "message": "No item to return was
  found"}`` (1.x: ``…got found``) when *When last node finishes* has nothing to send, though the
  run usually succeeded; ``500 There was a problem executing the workflow``; ``500 Workflow
  Webhook Error: Workflow could not be started!`` (the run still goes ahead); engine v2's ``500
  The execution was cancelled`` and ``504 The workflow did not answer in time``. And a Respond to
  Webhook node sends whatever status it is configured with (any 3xx, 4xx or 5xx), after the
  work before it. n8n has no rate limiting of its own on webhooks: a 429 is a proxy's (nothing
  ran) or a Respond to Webhook node's (it ran), and nothing tells them apart.
- Answers that prove no run started, all sent before the workflow is handed to the runner
  (``abstract-server.ts``, ``webhook-request-handler.ts``, ``webhook-helpers.ts``, the Webhook
  node): ``404 The requested webhook "POST path" is not registered.`` / ``This webhook is not
  registered for GET requests…``; ``503 {"code": 503, "message": "Database is not ready!"}`` and
  ``200 n8n is starting up. Please wait`` (text, while n8n starts); the Webhook node's own
  ``401``/``403`` (``Authorization is required!``, ``Authorization data is wrong!``, with
  ``WWW-Authenticate: Basic realm="Webhook"``; ``IP is not whitelisted to access the webhook!``);
  ``415 Expected multipart/form-data``; ``428`` with the missing credentials
  (``readyToExecute: false``). A proxy's 502/503/504 proves nothing: the request may have
  reached n8n before the proxy gave up on it.
- n8n never de-duplicates webhook calls: a second POST is a second run. Hence the rules below on
  which failures may be retried, and the ``X-Conveyor-Job-Id`` header a workflow can use to
  de-duplicate itself (it appears in the Webhook node's output, ``headers``).
- ``GET /api/v1/executions/{id}?includeData=true`` with ``X-N8N-API-KEY`` returns the execution with
  ``data.resultData`` = ``{runData: {node: [taskData…]}, lastNodeExecuted, error?}``; statuses are
  new, running, waiting, success, error, canceled, crashed, unknown.

Failures map onto ``workers.failures``: ``Retryable`` only when n8n provably did not start the
workflow (never sent, starting up, database not ready) or the call is a read; ``Permanent``
when n8n refused it before any run and trying again cannot help (not registered, the Webhook
node's authentication); ``WorkflowFailed`` for ``500 Error in workflow``; and
``TriggerOutcomeUnknown`` for every other answer to a webhook call that was sent — no answer at
all, any other 3xx/4xx/5xx (429 included) — so the caller never fires a second time blindly.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from random import Random
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError
from urllib3.exceptions import ProxyError as _Urllib3ProxyError

from conveyor.config import Env, redact_url
from conveyor.errors import ConfigError
from workers.failures import Permanent, Retryable, compute_backoff
from workers.resilience.retry_after import retry_after_s

ExecutionStatus = Literal[
    "new", "running", "waiting", "success", "error", "canceled", "crashed", "unknown"
]
#: Every status n8n's public API reports (its ``ExecutionStatusList``).
EXECUTION_STATUSES: frozenset[str] = frozenset(get_args(ExecutionStatus))
#: n8n's own ``TERMINAL_EXECUTION_STATUSES``: ``waiting`` (a Wait node) resumes later.
TERMINAL_STATUSES: frozenset[str] = frozenset({"success", "error", "canceled", "crashed"})

#: Sent with every trigger, so a workflow can de-duplicate a redelivered job itself.
IDEMPOTENCY_HEADER = "X-Conveyor-Job-Id"
#: The public API's key header. Sent to ``/api/v1`` only: a webhook's workflow sees (and stores
#: in its execution data) every header it receives.
API_KEY_HEADER = "X-N8N-API-KEY"
#: Keys of an early webhook answer that carry the execution id. ``executionId`` is n8n's own
#: spelling (its chat and form responses); ``execution_id`` is accepted for snake_case workflows.
#: A bare ``id`` is not: a synchronous workflow's output often has one of its own.
EXECUTION_ID_KEYS: tuple[str, ...] = ("executionId", "execution_id")

#: A webhook path, as n8n registers it (``orders/summarize``, ``{uuid}/path``, ``user/:id``).
#: Anything else — a scheme, ``//host``, a leading ``/``, ``..``, ``?``, ``#``, ``%`` — is
#: refused, so a job can never aim the worker at another host or another n8n endpoint.
_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._~-]*(/[A-Za-z0-9._~:-]+)*")
_EXECUTION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: A header value we send: visible ASCII only, so nothing can split a header. n8n 2.x API keys
#: are JWTs (~270 characters; n8n stores them in a plain text column, no length limit) and
#: legacy ones are 88: 4096 is ~15 times a real key, under nginx's default 8 KiB header line
#: and Node's 16 KiB of headers in all.
_HEADER_VALUE = re.compile(r"[!-~]{1,4096}")

#: n8n's answer when a webhook's workflow ran and failed before answering (webhook-helpers.ts).
_WORKFLOW_FAILED_MESSAGE = "Error in workflow"
#: "When last node finishes" with nothing to send (2.x; 1.x says "got found"): the run is over,
#: usually a success.
_NO_ITEM_MESSAGE = re.compile(r"No item to return (was|got) found")
#: n8n's answers that prove no run started: sent before the workflow reaches the runner.
_STARTING_UP_PAGE = "n8n is starting up. Please wait"  # 200 text/html (abstract-server.ts)
_DATABASE_NOT_READY = "Database is not ready!"  # 503 (abstract-server.ts)
_NOT_REGISTERED = re.compile(
    r'The requested webhook "[^"]*" is not registered|This webhook is not registered for \w+ '
)
#: The Webhook node's own refusals (its ``WebhookAuthorizationError``, its IP whitelist),
#: answered before it hands anything to the workflow.
_WEBHOOK_AUTH_REALM = 'Basic realm="Webhook"'
_WEBHOOK_AUTH_MESSAGES = frozenset(
    {
        "Authorization is required!",
        "Authorization data is wrong!",
        "Authorization problem!",
        "IP is not whitelisted to access the webhook!",
    }
)
_MULTIPART_REQUIRED = "Expected multipart/form-data"  # 415, before the body is parsed


class TriggerOutcomeUnknown(Permanent):
    """The webhook call was sent and what came back does not say whether a run started: no
    answer (read timeout, dropped connection), a proxy's or n8n's own 5xx after the run (``No
    item to return was found``), a Respond to Webhook node's error status. n8n may have run the
    workflow, even to its end. Never retried blindly — the caller reconciles (n8n's executions
    list; the Webhook node's headers carry ``X-Conveyor-Job-Id``)."""

    reason = "unknown_outcome"


class WorkflowFailed(Permanent):
    """The workflow ran and failed. Running it again would repeat whatever it did first."""

    reason = "workflow_failed"


@dataclass(frozen=True)
class TriggerResult:
    """n8n's answer to a webhook call: the JSON body (or text), and the execution id when the
    workflow answered early with one (see ``EXECUTION_ID_KEYS``)."""

    status_code: int
    body: Any
    execution_id: str | None


@dataclass(frozen=True)
class Execution:
    """One execution as n8n's public API reports it.

    ``output`` is the JSON of every item the last executed node produced in its last run, on
    its first non-empty main output (what n8n's "When last node finishes" response reads from);
    ``None`` while that is not known (not finished, data not stored, too large to display).
    ``error_message`` / ``error_node`` are ``data.resultData.error.message`` and
    ``….error.node.name``, falling back to the first node run that carries an error.
    """

    id: str
    status: ExecutionStatus
    finished: bool
    workflow_id: str | None
    started_at: datetime | None
    stopped_at: datetime | None
    last_node: str | None
    output: list[Any] | None
    error_message: str | None
    error_node: str | None

    @property
    def terminal(self) -> bool:
        return is_terminal(self.status)


def is_terminal(status: str) -> bool:
    """Whether an execution in ``status`` has ended for good (n8n's terminal statuses)."""
    return status in TERMINAL_STATUSES


def next_poll_delay(
    attempt: int, *, base_s: float, cap_s: float, rng: Random | None = None
) -> float:
    """Seconds before poll number ``attempt`` (0-based) of a running execution.

    Short first (most webhooks finish in seconds), backing off to ``cap_s`` so a fleet following
    long runs does not hammer n8n's API; jittered so executions started together spread out.
    The same curve as retries (``compute_backoff``), so there is one backoff to tune.
    """
    return compute_backoff(attempt, base_s=base_s, cap_s=cap_s, rng=rng)


class N8nClient:
    """One n8n instance: its base URL and API key come from configuration, never from a job.

    One ``requests.Session`` (shared by the worker's threads) with urllib3's retries off: a
    retried POST would be a second workflow run, so every retry decision is the caller's.
    Redirects are never followed: they would carry the API key to wherever they point.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        workflow_paths: Mapping[str, str] | None = None,
        max_connections: int = 16,
    ):
        self.base_url = _check_base_url(base_url)
        self._api_key = api_key or None
        if connect_timeout_s <= 0 or read_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        self.connect_timeout_s = float(connect_timeout_s)
        self.read_timeout_s = float(read_timeout_s)
        self.workflow_paths: dict[str, str] = {}
        for name, path in (workflow_paths or {}).items():
            if not _PATH.fullmatch(path) or _has_dot_segment(path):
                raise ValueError(f"workflow {name!r} maps to {path!r}, which is not a webhook path")
            self.workflow_paths[name] = path
        self._session = requests.Session()
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max_connections, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._session.headers.update({"Accept": "application/json", "User-Agent": "conveyor-n8n"})

    def __repr__(self) -> str:
        key = "<set>" if self._api_key else "<unset>"
        names = sorted(self.workflow_paths)
        return f"N8nClient(base_url={self.base_url!r}, api_key={key}, workflows={names!r})"

    @property
    def can_follow(self) -> bool:
        """Whether executions can be read (an API key is set): an async run needs it, so a job
        checks this before it triggers a run it could not follow."""
        return self._api_key is not None

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> N8nClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def resolve_path(self, workflow: str) -> str:
        """The webhook path for ``workflow``: its mapping in ``N8N_WORKFLOWS``, else itself.

        Never a URL: the host is configuration's alone (no SSRF through a job's payload).
        """
        path = self.workflow_paths.get(workflow, workflow)
        return _check_path(path)

    def trigger(
        self,
        path: str,
        data: Any,
        *,
        idempotency_key: str,
        read_timeout_s: float | None = None,
    ) -> TriggerResult:
        """``POST {base}/webhook/{path}`` with ``data`` as JSON; n8n's answer, or why not.

        ``read_timeout_s`` bounds the wait for a synchronous workflow (default: the client's);
        past it the outcome is unknown, never retried.
        """
        path = _check_path(path)
        if not _HEADER_VALUE.fullmatch(idempotency_key or ""):
            raise Permanent(f"idempotency key {idempotency_key!r} is not a usable header value")
        try:
            body = json.dumps(data, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise Permanent(f"workflow data is not JSON: {exc}") from None
        read_s = self.read_timeout_s if read_timeout_s is None else float(read_timeout_s)
        try:
            response = self._session.post(
                f"{self.base_url}/webhook/{path}",
                data=body.encode(),
                headers={"Content-Type": "application/json", IDEMPOTENCY_HEADER: idempotency_key},
                timeout=(self.connect_timeout_s, read_s),
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            if _never_sent(exc):
                raise Retryable(f"n8n unreachable at {self.base_url}: {_describe(exc)}") from exc
            raise TriggerOutcomeUnknown(
                f"webhook {path!r} got no answer ({_describe(exc)}) after the request was sent: "
                f"n8n may be running it. Not retried; look for job {idempotency_key} in n8n's "
                f"executions ({IDEMPOTENCY_HEADER} header)"
            ) from exc
        return _trigger_result(path, idempotency_key, response)

    def get_execution(self, execution_id: str | int) -> Execution:
        """``GET {base}/api/v1/executions/{id}?includeData=true``: where a run is, and its end."""
        if not self._api_key:
            raise Permanent("N8N_API_KEY is not set: cannot read executions from n8n's public API")
        eid = str(execution_id)
        if not _EXECUTION_ID.fullmatch(eid):
            raise Permanent(f"{eid!r} is not an n8n execution id")
        try:
            response = self._session.get(
                f"{self.base_url}/api/v1/executions/{eid}",
                params={"includeData": "true"},
                headers={API_KEY_HEADER: self._api_key},
                timeout=(self.connect_timeout_s, self.read_timeout_s),
                allow_redirects=False,
            )
        except requests.RequestException as exc:  # a read: always safe to repeat
            raise Retryable(f"n8n API unreachable at {self.base_url}: {_describe(exc)}") from exc
        status = response.status_code
        body = _parse_body(response)
        message = _message(body, response)
        if status == 200 and isinstance(body, dict):
            return parse_execution(body)
        if status == 200:
            raise Permanent(f"n8n API answered execution {eid} with something not JSON: {message}")
        if status == 401:
            raise Permanent(f"n8n API refused the key (401: {message}): check N8N_API_KEY")
        if status == 403:
            raise Permanent(
                f"n8n API key may not read executions (403: {message}): "
                "it needs the execution:read scope"
            )
        if status == 404:
            raise Permanent(
                f"n8n execution {eid} not found (404: {message}): pruned, not visible to the "
                "API key's owner, or the public API is disabled"
            )
        if status == 429 or status >= 500:
            raise Retryable(
                f"n8n API answered {status} for execution {eid}: {message}",
                delay_s=retry_after_s(response.headers),
            )
        raise Permanent(f"n8n API answered {status} for execution {eid}: {message}")


def parse_execution(doc: Mapping[str, Any]) -> Execution:
    """An ``Execution`` from the public API's JSON (string or numeric ids, any n8n 1.x/2.x)."""
    raw_status = doc.get("status")
    status = raw_status if raw_status in EXECUTION_STATUSES else "unknown"
    data = doc.get("data")
    result = data.get("resultData") if isinstance(data, dict) else None
    result = result if isinstance(result, dict) else {}
    run_data: dict[str, Any] = result["runData"] if isinstance(result.get("runData"), dict) else {}
    last_node = (
        result.get("lastNodeExecuted") if isinstance(result.get("lastNodeExecuted"), str) else None
    )
    error_message, error_node = _error_of(result.get("error"), run_data)
    if error_node is None and error_message is not None and status == "error":
        error_node = last_node
    output = _last_node_output(run_data, last_node) if status == "success" else None
    workflow_id = doc.get("workflowId")
    return Execution(
        id=str(doc.get("id")),
        status=status,  # type: ignore[arg-type]  # narrowed by EXECUTION_STATUSES
        finished=bool(doc.get("finished")),
        workflow_id=None if workflow_id is None else str(workflow_id),
        started_at=_parse_time(doc.get("startedAt")),
        stopped_at=_parse_time(doc.get("stoppedAt")),
        last_node=last_node,
        output=output,
        error_message=error_message,
        error_node=error_node,
    )


@dataclass(frozen=True)
class N8nConfig:
    """The n8n instance a worker talks to, as configured (never shown: ``__repr__`` hides the
    key, since Flower and logs may print settings)."""

    base_url: str
    api_key: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    workflow_paths: Mapping[str, str] = field(default_factory=dict)

    def client(self) -> N8nClient:
        return N8nClient(
            self.base_url,
            self.api_key,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            workflow_paths=self.workflow_paths,
        )


def n8n_config_from_env(environ: Env | Mapping[str, str] | None = None) -> N8nConfig | None:
    """The instance configured by the environment, or ``None`` when ``N8N_BASE_URL`` is unset.

    ``N8N_BASE_URL`` n8n's root URL (with its ``N8N_PATH`` prefix if any);
    ``N8N_API_KEY`` the public API key (needed to follow async runs; never logged or shown);
    ``N8N_WORKFLOWS`` optional JSON object, workflow name -> webhook path;
    ``N8N_CONNECT_TIMEOUT`` seconds to open a connection (default 5: a LAN or one region away);
    ``N8N_READ_TIMEOUT`` seconds to wait for an answer (default 60: a synchronous workflow's
    whole run, under the n8n pool's soft time limit of 96 s).
    """
    env = environ if isinstance(environ, Env) else Env(environ)
    # Every setting is checked even when N8N_BASE_URL is unset: a typo found at start, not on
    # the day the URL is added.
    workflow_paths = _env_workflows(env)
    connect_timeout_s = env.seconds("N8N_CONNECT_TIMEOUT", 5.0)
    read_timeout_s = env.seconds("N8N_READ_TIMEOUT", 60.0)
    api_key = env.raw("N8N_API_KEY")
    if api_key is not None and not _HEADER_VALUE.fullmatch(api_key):
        raise ConfigError(
            "N8N_API_KEY is malformed (spaces, control or non-ASCII characters, or over "
            "4096 characters); value not shown"
        )
    base_url = env.raw("N8N_BASE_URL")
    if base_url is None:
        return None
    try:
        _check_base_url(base_url)
    except ValueError as exc:
        raise ConfigError(f"N8N_BASE_URL={redact_url(base_url)!r}: {exc}") from None
    return N8nConfig(
        base_url=base_url,
        api_key=api_key,
        connect_timeout_s=connect_timeout_s,
        read_timeout_s=read_timeout_s,
        workflow_paths=workflow_paths,
    )


def n8n_from_env(environ: Mapping[str, str] | None = None) -> N8nClient | None:
    """A client for the instance the environment configures (``n8n_config_from_env``)."""
    config = n8n_config_from_env(environ)
    return config.client() if config else None


# -- helpers ------------------------------------------------------------------------------------


def _check_path(path: str) -> str:
    if not isinstance(path, str) or not _PATH.fullmatch(path) or _has_dot_segment(path):
        raise Permanent(
            f"workflow {path!r} is neither a configured workflow name nor a webhook path "
            "(URLs are never accepted: n8n's address comes from N8N_BASE_URL)"
        )
    return path


def _has_dot_segment(path: str) -> bool:
    return any(segment in {".", ".."} for segment in path.split("/"))


def _check_base_url(url: str) -> str:
    parts = urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (they would appear in messages)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    path = parts.path.rstrip("/")
    if path.endswith(("/api/v1", "/webhook", "/webhook-test")):
        raise ValueError("give n8n's root URL, without /api/v1 or /webhook")
    return f"{parts.scheme}://{parts.netloc}{path}"


def _never_sent(exc: requests.RequestException) -> bool:
    """Whether the request cannot have reached n8n: no connection was ever made, or it was
    refused before sending (bad header, bad URL). Anything else may have started a run."""
    if isinstance(exc, requests.ConnectTimeout | requests.exceptions.SSLError):
        return True
    if isinstance(
        exc,
        requests.exceptions.InvalidHeader
        | requests.exceptions.InvalidURL
        | requests.exceptions.InvalidSchema
        | requests.exceptions.MissingSchema,
    ):
        return True
    cause: object = exc.args[0] if exc.args else None
    for _ in range(4):  # ConnectionError(MaxRetryError(reason=ProxyError(original_error)))
        if isinstance(cause, MaxRetryError):
            cause = cause.reason
        elif isinstance(cause, _Urllib3ProxyError):
            cause = cause.original_error
        else:
            break
    # urllib3's NewConnectionError (refused, unreachable, DNS) is a ConnectTimeoutError too.
    return isinstance(exc, requests.ConnectionError) and isinstance(cause, ConnectTimeoutError)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _trigger_result(path: str, key: str, response: requests.Response) -> TriggerResult:
    """n8n's answer to a webhook call that was sent, or the failure it means.

    Only answers in n8n's own words that are sent before any run starts are retried or give
    the trigger back; everything else that is not a success may have run the workflow.
    """
    status = response.status_code
    body = _parse_body(response)
    where = f"POST /webhook/{path}"
    if status == 200 and isinstance(body, str) and body.strip() == _STARTING_UP_PAGE:
        raise Retryable(f"{where}: n8n is starting up (its database is not migrated yet)")
    if 200 <= status < 300:
        return TriggerResult(status, body, _execution_id(body))
    message = _message(body, response)
    said = _said(body)  # n8n's own message, without the hint
    if status == 503 and said == _DATABASE_NOT_READY:
        raise Retryable(
            f"{where} answered 503: {message} (n8n is starting or lost its database)",
            delay_s=retry_after_s(response.headers),
        )
    if status == 404 and said is not None and _NOT_REGISTERED.match(said):
        raise Permanent(
            f"webhook path not registered: is the workflow active/published? ({where}: {message})"
        )
    if status in (401, 403) and (
        said in _WEBHOOK_AUTH_MESSAGES
        or response.headers.get("WWW-Authenticate", "").strip() == _WEBHOOK_AUTH_REALM
    ):
        raise Permanent(
            f"n8n refused the webhook call ({status}: {message}): the workflow's Webhook node "
            "requires credentials Conveyor does not send"
        )
    if status == 415 and said == _MULTIPART_REQUIRED:
        raise Permanent(
            f"{where} answered 415 ({message}): the workflow starts with a form, not a Webhook "
            "node taking JSON"
        )
    if status == 428 and isinstance(body, dict) and body.get("readyToExecute") is False:
        raise Permanent(
            f"{where} answered 428: the workflow's credentials are not connected yet "
            f"({_json_text(body)[:300]})"
        )
    if status == 500 and said == _WORKFLOW_FAILED_MESSAGE:
        raise WorkflowFailed(
            f"workflow at {path!r} failed ({where}: {message}); see n8n's executions for job {key}"
        )
    raise TriggerOutcomeUnknown(
        f"{where} answered {status} ({message}){_why_unknown(status, said, response)}: the "
        f"workflow may have started, or run to its end. Not retried; look for job {key} in "
        f"n8n's executions ({IDEMPOTENCY_HEADER} header)"
    )


def _why_unknown(status: int, said: str | None, response: requests.Response) -> str:
    """What else an answer that leaves the outcome unknown suggests, for whoever checks n8n."""
    if status == 500 and said is not None and _NO_ITEM_MESSAGE.search(said):
        return (
            ", n8n's answer when the workflow ran but its last node returned no item for "
            "'When last node finishes' to send"
        )
    if 300 <= status < 400:
        where_to = response.headers.get("Location", "")
        return (
            f", a redirect{f' to {where_to}' if where_to else ''} (not followed): a proxy's "
            "means N8N_BASE_URL is wrong and nothing ran; a Respond to Webhook node's means it ran"
        )
    if status == 429:
        return (
            ", which n8n never answers itself: a proxy's limit (nothing ran) or a Respond to "
            "Webhook node's answer (it ran)"
        )
    if status in (502, 503, 504):
        return ", maybe from a proxy in front of n8n, after the request reached n8n or not"
    return ""


def _parse_body(response: requests.Response) -> Any:
    if not response.content:
        return None
    if "json" in response.headers.get("Content-Type", ""):
        try:
            return response.json()
        except ValueError:
            pass
    return response.text


def _said(body: Any) -> str | None:
    """n8n's own message: ``message`` of its JSON error bodies, else a plain text body."""
    if isinstance(body, dict):
        message = body.get("message")
        return message.strip() if isinstance(message, str) else None
    if isinstance(body, str):
        return body.strip()
    return None


def _json_text(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))


def _message(body: Any, response: requests.Response) -> str:
    """n8n's own words: ``message`` (and ``hint``) of its error bodies, else the text."""
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        hint = body.get("hint")
        return f"{body['message']} {hint}" if isinstance(hint, str) and hint else body["message"]
    if isinstance(body, str):
        return body.strip()[:300] or response.reason or ""
    return response.reason or ""


def _execution_id(body: Any) -> str | None:
    if not isinstance(body, dict):
        return None
    for key in EXECUTION_ID_KEYS:
        value = body.get(key)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def _error_of(error: Any, run_data: Mapping[str, Any]) -> tuple[str | None, str | None]:
    message = node = None
    if isinstance(error, dict):
        if isinstance(error.get("message"), str):
            message = error["message"]
        node_info = error.get("node")
        if isinstance(node_info, dict) and isinstance(node_info.get("name"), str):
            node = node_info["name"]
        elif isinstance(node_info, str):
            node = node_info
    if node is None:  # no node on the workflow-level error: the first node run that failed
        for name, runs in run_data.items():
            failed = (
                [r for r in runs if isinstance(r, dict) and r.get("error")]
                if isinstance(runs, list)
                else []
            )
            if failed:
                node = name
                node_error = failed[-1]["error"]
                if message is None and isinstance(node_error, dict):
                    message = (
                        node_error.get("message")
                        if isinstance(node_error.get("message"), str)
                        else None
                    )
                break
    return message, node


def _last_node_output(run_data: Mapping[str, Any], last_node: str | None) -> list[Any] | None:
    runs = run_data.get(last_node) if last_node else None
    if not isinstance(runs, list) or not runs or not isinstance(runs[-1], dict):
        return None
    data = runs[-1].get("data")
    main = data.get("main") if isinstance(data, dict) else None
    if not isinstance(main, list):
        return None
    for branch in main:
        if isinstance(branch, list) and branch:
            return [item.get("json") for item in branch if isinstance(item, dict)]
    return []


def _parse_time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def _env_workflows(env: Env) -> dict[str, str]:
    mapping = env.json("N8N_WORKFLOWS")
    if mapping is None:
        return {}
    if not isinstance(mapping, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise ConfigError('N8N_WORKFLOWS must be a JSON object of names to paths, {"name": "path"}')
    for name, path in mapping.items():
        if not _PATH.fullmatch(path) or _has_dot_segment(path):
            raise ConfigError(
                f"N8N_WORKFLOWS maps {name!r} to {path!r}, which is not a webhook path "
                "(give the path after /webhook/, never a URL)"
            )
    return mapping
