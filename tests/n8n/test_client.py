"""The n8n client against a fake n8n over real HTTP: what each answer of n8n's means to a job."""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Iterator

import pytest
import requests

from conveyor.errors import ConfigError
from tests.fakes import n8n_server as fake_n8n
from tests.fakes.n8n_server import TEST_API_KEY, FakeN8n
from workers.failures import Permanent, Retryable
from workers.n8n.client import (
    IDEMPOTENCY_HEADER,
    Execution,
    N8nClient,
    TriggerOutcomeUnknown,
    WorkflowFailed,
    is_terminal,
    n8n_from_env,
    next_poll_delay,
    parse_execution,
)

#: The ``n8n_server`` fixture, under its own name (the same one if conftest provides it too).
n8n_server = fake_n8n.n8n_server


def _client(base_url: str, api_key: str | None = TEST_API_KEY, **kwargs) -> N8nClient:
    options = {"connect_timeout_s": 2.0, "read_timeout_s": 5.0} | kwargs
    return N8nClient(base_url, api_key, **options)


@pytest.fixture
def client(n8n_server: FakeN8n) -> Iterator[N8nClient]:
    with _client(n8n_server.url, workflow_paths={"summarize": "orders/summarize"}) as c:
        yield c


def _follow(client: N8nClient, execution_id: str, *, deadline_s: float = 5.0) -> list[Execution]:
    """Polls like a job would, returning every observation up to the terminal one."""
    seen: list[Execution] = []
    end = time.monotonic() + deadline_s
    attempt = 0
    while time.monotonic() < end:
        seen.append(client.get_execution(execution_id))
        if seen[-1].terminal:
            return seen
        time.sleep(next_poll_delay(attempt, base_s=0.02, cap_s=0.05))
        attempt += 1
    raise AssertionError(f"execution {execution_id} never ended: {[e.status for e in seen]}")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- triggering -----------------------------------------------------------------------------------


def test_sync_trigger_returns_the_workflows_answer(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_sync("orders/summarize", {"summary": "3 orders", "total": 42})

    result = client.trigger("orders/summarize", {"orders": [1, 2, 3]}, idempotency_key="job-1")

    assert result.status_code == 200
    assert result.body == {"summary": "3 orders", "total": 42}
    assert result.execution_id is None
    assert n8n_server.calls("orders/summarize") == 1
    assert n8n_server.received("orders/summarize")[0].body == {"orders": [1, 2, 3]}


def test_trigger_sends_the_job_id_and_never_the_api_key(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_sync("hook", {"ok": True})

    client.trigger("hook", {}, idempotency_key="job-42")

    headers = n8n_server.received("hook")[0].headers
    assert headers[IDEMPOTENCY_HEADER.lower()] == "job-42"
    assert "x-n8n-api-key" not in headers
    assert TEST_API_KEY not in str(headers)


def test_slow_sync_workflow_within_the_read_timeout_answers(n8n_server: FakeN8n):
    n8n_server.add_slow("slow", {"done": True}, delay_s=0.3)

    with _client(n8n_server.url, read_timeout_s=3.0) as client:
        started = time.monotonic()
        result = client.trigger("slow", {}, idempotency_key="job-slow")

    assert result.body == {"done": True}
    assert time.monotonic() - started >= 0.3


def test_async_trigger_returns_the_execution_which_is_followed_to_success(
    n8n_server: FakeN8n, client: N8nClient
):
    workflow = n8n_server.add_async("reports/build", {"report": "r-7"}, queued_s=0.3, run_s=0.3)

    result = client.trigger("reports/build", {"month": 11}, idempotency_key="job-async")
    assert result.execution_id is not None
    assert result.execution_id in n8n_server.executions("reports/build")

    seen = _follow(client, result.execution_id)
    statuses = [e.status for e in seen]
    assert statuses[0] == "new" and not seen[0].terminal and seen[0].output is None
    assert statuses[-1] == "success"
    order = ["new", "running", "success"]
    assert [order.index(s) for s in statuses] == sorted(order.index(s) for s in statuses)

    done = seen[-1]
    assert done.finished is True
    assert done.output == [{"report": "r-7"}]
    assert done.last_node == "Respond to Webhook"
    assert done.workflow_id == workflow.id
    assert done.started_at is not None and done.stopped_at is not None
    assert done.stopped_at >= done.started_at
    assert done.error_message is None and done.error_node is None


def test_failing_workflow_reports_n8ns_message_and_node(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_failing("crm/sync", message="Invalid API token for CRM", node="Update CRM")

    result = client.trigger("crm/sync", {}, idempotency_key="job-fail")
    assert result.execution_id is not None
    failed = _follow(client, result.execution_id)[-1]

    assert failed.status == "error"
    assert failed.finished is False
    assert failed.error_message == "Invalid API token for CRM"
    assert failed.error_node == "Update CRM"
    assert failed.output is None


def test_sync_workflow_that_fails_is_a_permanent_workflow_failure(
    n8n_server: FakeN8n, client: N8nClient
):
    n8n_server.add_failing("crm/sync", message="boom", node="Update CRM", early=False, run_s=0.05)

    with pytest.raises(WorkflowFailed, match="Error in workflow") as caught:
        client.trigger("crm/sync", {}, idempotency_key="job-fail-sync")

    assert isinstance(caught.value, Permanent) and caught.value.reason == "workflow_failed"
    assert n8n_server.calls("crm/sync") == 1


def test_each_webhook_call_is_counted_and_is_a_new_run(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_sync("a", {"n": 1})
    n8n_server.add_sync("b", {"n": 2})

    client.trigger("a", {}, idempotency_key="job-a")
    client.trigger("a", {}, idempotency_key="job-a")  # n8n does not de-duplicate webhooks

    assert n8n_server.calls("a") == 2
    assert len(n8n_server.executions("a")) == 2
    assert n8n_server.calls("b") == 0


# -- what failures mean ---------------------------------------------------------------------------


def test_unregistered_webhook_is_permanent_with_a_clear_message(
    n8n_server: FakeN8n, client: N8nClient
):
    with pytest.raises(Permanent) as caught:
        client.trigger("not/published", {}, idempotency_key="job-404")

    message = str(caught.value)
    assert "webhook path not registered: is the workflow active/published?" in message
    assert '"POST not/published" is not registered' in message  # n8n's own words kept
    assert not isinstance(caught.value, TriggerOutcomeUnknown)


def test_a_webhook_registered_for_another_method_is_permanent(
    n8n_server: FakeN8n, client: N8nClient
):
    message = (
        "This webhook is not registered for POST requests. Did you mean to make a GET request?"
    )
    n8n_server.fail_next(1, status=404, body={"code": 404, "message": message})

    with pytest.raises(Permanent, match="webhook path not registered") as caught:
        client.trigger("hook", {}, idempotency_key="job-method")

    assert not isinstance(caught.value, TriggerOutcomeUnknown)


def test_the_fake_leaves_an_empty_hint_out_like_n8n(n8n_server: FakeN8n):
    n8n_server.add_sync("hook", {"ok": True})

    response = requests.get(f"{n8n_server.url}/webhook/hook", timeout=5)

    assert response.status_code == 404
    assert response.json() == {
        "code": 404,
        "message": "This webhook is not registered for GET requests. "
        "Did you mean to make a POST request?",
    }
    assert n8n_server.runs("hook") == 0


def test_database_not_ready_is_retryable_and_the_retry_runs_once(
    n8n_server: FakeN8n, client: N8nClient
):
    n8n_server.add_sync("hook", {"ok": True})
    n8n_server.database_not_ready(1)

    with pytest.raises(Retryable, match="Database is not ready!") as caught:
        client.trigger("hook", {}, idempotency_key="job-db")
    assert not isinstance(caught.value, Permanent)
    assert n8n_server.runs("hook") == 0  # n8n answers it before looking the webhook up
    result = client.trigger("hook", {}, idempotency_key="job-db")

    assert result.body == {"ok": True}
    assert (n8n_server.calls("hook"), n8n_server.runs("hook")) == (2, 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_the_starting_up_page_is_retryable_never_a_result(
    n8n_server: FakeN8n, client: N8nClient, mode: str
):
    """n8n serves its "starting up" page with status 200: neither a sync workflow's output nor
    an async trigger without an execution id, since no run started."""
    if mode == "sync":
        n8n_server.add_sync("hook", {"ok": True})
    else:
        n8n_server.add_async("hook", {"ok": True})
    n8n_server.starting_up(1)

    with pytest.raises(Retryable, match="starting up") as caught:
        client.trigger("hook", {}, idempotency_key="job-starting")
    assert not isinstance(caught.value, Permanent)
    assert n8n_server.runs("hook") == 0
    result = client.trigger("hook", {}, idempotency_key="job-starting")

    if mode == "sync":
        assert result.body == {"ok": True}
    else:
        assert result.execution_id in n8n_server.executions("hook")
    assert (n8n_server.calls("hook"), n8n_server.runs("hook")) == (2, 1)


@pytest.mark.parametrize("legacy", [False, True], ids=["2.x", "1.x"])
def test_no_item_to_return_after_the_run_is_outcome_unknown(
    n8n_server: FakeN8n, client: N8nClient, legacy: bool
):
    n8n_server.add_no_item("hook", legacy=legacy)

    with pytest.raises(TriggerOutcomeUnknown) as caught:
        client.trigger("hook", {}, idempotency_key="job-no-item")

    assert caught.value.reason == "unknown_outcome"
    message = str(caught.value)
    assert "No item to return" in message and "returned no item" in message
    assert "job-no-item" in message and IDEMPOTENCY_HEADER in message
    assert (n8n_server.calls("hook"), n8n_server.runs("hook")) == (1, 1)  # it did run


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, {"error": "CRM is down"}),
        (500, {"message": "Payment declined"}),
        (503, "maintenance"),
        (400, {"message": "invalid order"}),
        (401, {"error": "not allowed"}),
        (404, {"message": "order not found"}),
        (409, {"message": "already exists"}),
        (429, {"message": "slow down"}),
    ],
)
def test_a_respond_to_webhook_error_status_is_outcome_unknown(
    n8n_server: FakeN8n, client: N8nClient, status: int, body: object
):
    """A Respond to Webhook node answers any status it is configured with, after the nodes
    before it ran: only n8n's own "never started" answers may be retried or given back."""
    n8n_server.add_responding("hook", status=status, body=body)

    with pytest.raises(TriggerOutcomeUnknown, match=f"answered {status}"):
        client.trigger("hook", {}, idempotency_key="job-respond")

    assert n8n_server.runs("hook") == 1


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (500, "There was a problem executing the workflow"),
        (500, "Workflow Webhook Error: Workflow could not be started!"),
        (500, "The execution was cancelled"),
        (504, "The workflow did not answer in time"),
    ],
)
def test_n8ns_own_errors_once_a_run_started_are_outcome_unknown(
    n8n_server: FakeN8n, client: N8nClient, status: int, message: str
):
    n8n_server.add_responding("hook", status=status, body={"code": 0, "message": message})

    with pytest.raises(TriggerOutcomeUnknown, match="may have started"):
        client.trigger("hook", {}, idempotency_key="job-n8n-5xx")

    assert n8n_server.calls("hook") == 1


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (502, "<html>502 Bad Gateway</html>"),
        (503, {"message": "Service Unavailable"}),
        (429, {"message": "Too Many Requests"}),
    ],
)
def test_a_proxys_error_proves_nothing_and_is_outcome_unknown(
    n8n_server: FakeN8n, client: N8nClient, status: int, body: object
):
    """A proxy in front of n8n answers these whether or not the request reached n8n (and n8n
    has no rate limit of its own on webhooks: a 429 is a proxy's or a Respond node's)."""
    n8n_server.add_sync("hook", {"ok": True})
    n8n_server.fail_next(1, status=status, body=body, headers={"Retry-After": "7"})

    with pytest.raises(TriggerOutcomeUnknown, match="may have started") as caught:
        client.trigger("hook", {}, idempotency_key="job-proxy")

    assert caught.value.reason == "unknown_outcome"
    assert n8n_server.calls("hook") == 1


def test_gateway_timeout_means_the_outcome_is_unknown(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_sync("hook", {"ok": True})
    n8n_server.fail_next(1, status=504, body="<html>504 Gateway Time-out</html>")

    with pytest.raises(TriggerOutcomeUnknown, match="may have started"):
        client.trigger("hook", {}, idempotency_key="job-504")


def test_webhook_requiring_credentials_is_permanent(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.fail_next(1, status=403, body={"message": "Authorization data is wrong!"})

    with pytest.raises(Permanent, match="Authorization data is wrong") as caught:
        client.trigger("hook", {}, idempotency_key="job-403")

    assert not isinstance(caught.value, TriggerOutcomeUnknown)


@pytest.mark.parametrize(
    ("status", "text", "headers"),
    [
        (401, "Authorization is required!", {"WWW-Authenticate": 'Basic realm="Webhook"'}),
        (403, "Invalid token", {"WWW-Authenticate": 'Basic realm="Webhook"'}),
        (403, "IP is not whitelisted to access the webhook!", {}),
    ],
)
def test_the_webhook_nodes_own_refusals_are_permanent(
    n8n_server: FakeN8n, client: N8nClient, status: int, text: str, headers: dict[str, str]
):
    """The Webhook node answers these in plain text before it hands anything to the workflow."""
    n8n_server.fail_next(1, status=status, body=text, headers=headers)

    with pytest.raises(Permanent, match="requires credentials") as caught:
        client.trigger("hook", {}, idempotency_key="job-auth")

    assert not isinstance(caught.value, TriggerOutcomeUnknown)


def test_redirect_is_not_followed(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.fail_next(1, status=302, body="", headers={"Location": n8n_server.url + "/other"})

    # A proxy's redirect (http -> https) or a Respond to Webhook node's, after its run.
    with pytest.raises(TriggerOutcomeUnknown, match="redirect") as caught:
        client.trigger("hook", {}, idempotency_key="job-302")

    assert "N8N_BASE_URL" in str(caught.value) and "/other" in str(caught.value)


def test_connection_refused_is_retryable():
    with (
        _client(f"http://127.0.0.1:{_closed_port()}") as client,
        pytest.raises(Retryable, match="unreachable") as caught,
    ):
        client.trigger("hook", {}, idempotency_key="job-refused")

    assert not isinstance(caught.value, Permanent)


def test_read_timeout_after_sending_is_outcome_unknown(n8n_server: FakeN8n):
    n8n_server.add_stall("stuck")

    with (
        _client(n8n_server.url, read_timeout_s=0.3) as client,
        pytest.raises(TriggerOutcomeUnknown) as caught,
    ):
        client.trigger("stuck", {}, idempotency_key="job-stuck")

    assert isinstance(caught.value, Permanent)  # never retried blindly
    assert caught.value.reason == "unknown_outcome"
    assert "job-stuck" in str(caught.value)
    assert n8n_server.calls("stuck") == 1  # n8n did receive it and started a run
    (execution_id,) = n8n_server.executions("stuck")
    assert n8n_server.execution_json(execution_id)["status"] == "running"


def test_connection_dropped_after_sending_is_outcome_unknown(
    n8n_server: FakeN8n, client: N8nClient
):
    n8n_server.add_stall("drops", drop_after_s=0.05)

    with pytest.raises(TriggerOutcomeUnknown):
        client.trigger("drops", {}, idempotency_key="job-drop")

    assert n8n_server.calls("drops") == 1


def test_data_that_is_not_json_is_refused_before_sending(n8n_server: FakeN8n, client: N8nClient):
    with pytest.raises(Permanent, match="not JSON"):
        client.trigger("hook", {"when": object()}, idempotency_key="job-bad")
    with pytest.raises(Permanent, match="header"):
        client.trigger("hook", {}, idempotency_key="job\r\nX-Evil: 1")

    assert n8n_server.calls("hook") == 0


# -- executions -----------------------------------------------------------------------------------


def test_rejected_api_key_is_permanent(n8n_server: FakeN8n):
    n8n_server.add_async("hook", {"ok": True})
    with _client(n8n_server.url) as good:
        execution_id = good.trigger("hook", {}, idempotency_key="job-key").execution_id
    assert execution_id is not None

    with (
        _client(n8n_server.url, api_key="wrong-key") as bad,
        pytest.raises(Permanent, match="check N8N_API_KEY") as caught,
    ):
        bad.get_execution(execution_id)
    assert "unauthorized" in str(caught.value)
    assert "wrong-key" not in str(caught.value)


def test_missing_api_key_is_permanent_without_calling_n8n(n8n_server: FakeN8n):
    n8n_server.add_async("hook", {"ok": True})
    with _client(n8n_server.url, api_key=None) as client:
        execution_id = client.trigger("hook", {}, idempotency_key="job-nokey").execution_id
        assert execution_id is not None
        with pytest.raises(Permanent, match="N8N_API_KEY is not set"):
            client.get_execution(execution_id)

    assert n8n_server.api_calls(execution_id) == 0


def test_unknown_execution_is_permanent(client: N8nClient):
    with pytest.raises(Permanent, match="999999 not found"):
        client.get_execution("999999")


def test_api_server_error_is_retryable(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_async("hook", {"ok": True}, queued_s=0, run_s=0)
    execution_id = client.trigger("hook", {}, idempotency_key="job-api").execution_id
    assert execution_id is not None
    n8n_server.fail_next(1, status=502, api=True)

    with pytest.raises(Retryable, match="502"):
        client.get_execution(execution_id)
    assert client.get_execution(execution_id).status == "success"


def test_api_unreachable_is_retryable():
    with (
        _client(f"http://127.0.0.1:{_closed_port()}") as client,
        pytest.raises(Retryable, match="unreachable"),
    ):
        client.get_execution("1001")


def test_parse_execution_accepts_numeric_ids_and_unknown_statuses():
    execution = parse_execution(
        {"id": 17, "status": "failed", "finished": False, "workflowId": 4, "data": {}}
    )

    assert execution.id == "17" and execution.workflow_id == "4"
    assert execution.status == "unknown"
    assert execution.output is None and execution.error_message is None


def test_node_error_without_workflow_error_names_the_node():
    run_data = {
        "Webhook": [{"data": {"main": [[{"json": {}}]]}}],
        "HTTP Request": [{"error": {"message": "ECONNREFUSED"}}],
    }
    execution = parse_execution(
        {"id": "5", "status": "error", "data": {"resultData": {"runData": run_data}}}
    )

    assert execution.error_message == "ECONNREFUSED"
    assert execution.error_node == "HTTP Request"


# -- paths and configuration ----------------------------------------------------------------------


def test_workflow_names_map_to_paths_and_paths_pass_through(n8n_server: FakeN8n, client: N8nClient):
    n8n_server.add_sync("orders/summarize", {"ok": True})

    assert client.resolve_path("summarize") == "orders/summarize"
    assert client.resolve_path("orders/other") == "orders/other"
    client.trigger(client.resolve_path("summarize"), {}, idempotency_key="job-map")
    assert n8n_server.calls("orders/summarize") == 1


@pytest.mark.parametrize(
    "workflow",
    [
        "http://evil.example/webhook/x",
        "https://127.0.0.1/x",
        "//evil.example/x",
        "/webhook/x",
        "../api/v1/executions",
        "a/../../api",
        "x?y=1",
        "x#top",
        "a\\b",
        "a%2F..",
        "",
    ],
)
def test_a_url_or_escaping_path_is_refused(n8n_server: FakeN8n, client: N8nClient, workflow: str):
    with pytest.raises(Permanent, match="never accepted"):
        client.resolve_path(workflow)
    with pytest.raises(Permanent):
        client.trigger(workflow, {}, idempotency_key="job-url")

    assert n8n_server.executions() == []


def test_api_key_never_appears_in_repr():
    secret = "n8n_api_0123456789abcdef"
    client = n8n_from_env({"N8N_BASE_URL": "http://n8n:5678", "N8N_API_KEY": secret})
    assert client is not None

    assert secret not in repr(client) and secret not in str(client)
    assert "api_key=<set>" in repr(client)


def test_configuration_from_the_environment():
    assert n8n_from_env({}) is None
    assert n8n_from_env({"N8N_BASE_URL": "  "}) is None

    client = n8n_from_env(
        {
            "N8N_BASE_URL": "https://n8n.internal/automation/",
            "N8N_WORKFLOWS": '{"summarize": "orders/summarize"}',
            "N8N_CONNECT_TIMEOUT": "2.5",
            "N8N_READ_TIMEOUT": "30",
        }
    )
    assert client is not None
    assert client.base_url == "https://n8n.internal/automation"
    assert client.workflow_paths == {"summarize": "orders/summarize"}
    assert (client.connect_timeout_s, client.read_timeout_s) == (2.5, 30.0)
    assert "api_key=<unset>" in repr(client)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("N8N_BASE_URL", "n8n:5678"),
        ("N8N_BASE_URL", "https://n8n.internal/api/v1"),
        ("N8N_BASE_URL", "https://user:pw@n8n.internal"),
        ("N8N_READ_TIMEOUT", "soon"),
        ("N8N_CONNECT_TIMEOUT", "0"),
        ("N8N_WORKFLOWS", "{not json"),
        ("N8N_WORKFLOWS", '["orders/summarize"]'),
        ("N8N_WORKFLOWS", '{"evil": "https://evil.example/x"}'),
    ],
)
def test_a_bad_setting_names_its_variable(variable: str, value: str):
    env = {"N8N_BASE_URL": "http://n8n:5678", variable: value}

    with pytest.raises(ConfigError, match=variable):
        n8n_from_env(env)


def test_a_malformed_api_key_is_reported_without_its_value():
    with pytest.raises(ConfigError, match="N8N_API_KEY") as caught:
        n8n_from_env({"N8N_BASE_URL": "http://n8n:5678", "N8N_API_KEY": "secret value\n"})

    assert "secret" not in str(caught.value)


# -- polling --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "terminal"),
    [
        ("success", True),
        ("error", True),
        ("canceled", True),
        ("crashed", True),
        ("new", False),
        ("running", False),
        ("waiting", False),
        ("unknown", False),
    ],
)
def test_terminal_statuses_are_n8ns(status: str, terminal: bool):
    assert is_terminal(status) is terminal


def test_poll_delay_backs_off_with_jitter_up_to_its_cap():
    rng = random.Random(7)
    delays = [next_poll_delay(n, base_s=1.0, cap_s=30.0, rng=rng) for n in range(12)]

    assert 0.5 <= delays[0] <= 1.0
    assert 4.0 <= delays[3] <= 8.0
    assert all(15.0 <= d <= 30.0 for d in delays[5:])
    assert len(set(delays)) == len(delays)  # jittered, not a fixed ladder
