"""The live page (``/ui``) in a real headless Chromium, against a real gateway in dev mode, real
workers, Redis and Postgres, and the fake LLM server: nothing in the browser is mocked.

The browser is Debian's ``/usr/bin/chromium``, driven by Playwright; no browser is downloaded.
Every test also checks that the page asked nothing of any other host (it must work on a closed
network) and raised no uncaught JavaScript error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from conveyor import keys
from tests.fakes.llm_server import Reply
from tests.support.ai import ai_env, fresh_upstream_state  # noqa: F401 - a fixture
from workers.store import dead_letters
from workers.store.models import DeadLetter

#: `make test` installs Debian's and passes its path; elsewhere set CHROMIUM yourself.
CHROMIUM = Path(os.environ.get("CHROMIUM") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Milliseconds: a job queued, picked up by an idle worker and run.
JOB_MS = 30_000
#: Milliseconds: one refresh of a table (every 2 s for jobs, 5 s for dead letters) and then some.
REFRESH_MS = 12_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the UI tests drive Debian's chromium "
            "(apt-get install chromium) and never download a browser",
            pytrace=False,
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: Browser, gateway, tmp_path: Path) -> Iterator[Page]:
    """A fresh browser context on the dev gateway; with an API key in ``gateway.headers`` it is
    put where the page keeps it (sessionStorage), as a user typing it would."""
    with browsing(browser, gateway, tmp_path, key=_api_key(gateway.headers)) as page:
        yield page


@contextlib.contextmanager
def browsing(browser: Browser, gateway, tmp_path: Path, *, key: str = "") -> Iterator[Page]:
    """A page in a fresh context that fails the test, at its end, if the page raised an
    uncaught error, asked any host but the gateway, or missed a file of /ui."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    if key:
        context.add_init_script(f"sessionStorage.setItem('conveyor.apiKey', {json.dumps(key)})")
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))
    page.on(
        "request",
        lambda request: (
            request.url.startswith(gateway.url)
            or problems.append(f"asked another host: {request.url}")
        ),
    )
    page.on(
        "response",
        lambda response: (
            response.url.startswith(f"{gateway.url}/ui")
            and response.status >= 400
            and problems.append(f"{response.status} for {response.url}")
        ),
    )
    try:
        yield page
    finally:
        page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)  # to look at after
        context.close()
    assert problems == [], problems


def _api_key(headers: dict[str, str]) -> str:
    for name, value in headers.items():
        if name.lower() == "authorization" and value.startswith("Bearer "):
            return value.removeprefix("Bearer ")
        if name.lower() == "x-api-key":
            return value
    return ""


def open_ui(page: Page, gateway, path: str = "/ui/") -> None:
    page.goto(f"{gateway.url}{path}")
    expect(page.locator("#gateway-url")).to_have_text(gateway.url)  # app.js ran
    expect(page.locator("#auth-notice")).to_be_hidden()


def job_row(page: Page, job_id: str):
    return page.locator(f'#jobs-body tr[data-job-id="{job_id}"]')


def seqs(page: Page) -> list[int]:
    return [int(s) for s in page.locator("#job-events li").evaluate_all(
        "items => items.map(li => li.dataset.seq)")]  # fmt: skip


def job_loaded(page: Page) -> None:
    """The selected job's panel has its job from the gateway, and no error."""
    answered = page.locator("#job-status:not(:empty), #job-error:not([hidden])").first
    expect(answered).to_be_visible(timeout=10_000)
    expect(page.locator("#job-error")).to_have_text("")


def shown_result(page: Page) -> dict:
    result = page.locator("#job-result")
    expect(result).to_have_attribute("data-success", re.compile("true|false"), timeout=10_000)
    return json.loads(result.inner_text())


def test_a_ping_from_the_form_shows_its_row_its_events_live_and_its_result(
    page, gateway, workers, unique
):
    workers.start("maintenance")
    open_ui(page, gateway, "/ui")  # redirected to /ui/, where app.js and app.css are found
    assert page.url == f"{gateway.url}/ui/"

    message = f"from the page {unique}"
    page.fill("#ping-message", message)
    page.fill("#ping-hold", "2")
    page.click("#submit-form button[type=submit]")

    panel = page.locator("#job")
    expect(panel).to_have_attribute("data-job-id", re.compile(r"\S"), timeout=10_000)
    job_id = panel.get_attribute("data-job-id")
    assert job_id
    expect(page.locator("#submit-status")).to_contain_text(job_id)
    expect(job_row(page, job_id)).to_be_visible(timeout=REFRESH_MS)
    expect(job_row(page, job_id)).to_have_class(re.compile(r"\bselected\b"))

    # Live: a progress event is on the page while the job still holds its worker.
    events = page.locator("#job-events li")
    progress = page.locator('#job-events li[data-event$="_progress"]')
    expect(progress.first).to_be_visible(timeout=JOB_MS)
    assert page.locator('#job-events li[data-type="complete"]').count() == 0, (
        "the progress of a job holding 2 s arrived only with its end: not followed live"
    )
    expect(page.locator("#job-stream")).to_have_attribute("data-state", "live")

    complete = page.locator('#job-events li[data-type="complete"]')
    expect(complete).to_have_count(1, timeout=JOB_MS)
    expect(page.locator("#job-stream")).to_have_attribute("data-state", "ended")
    names = events.evaluate_all("items => items.map(li => li.dataset.event)")
    assert names[0] == "maintenance_start" and names[-1] == "maintenance_complete", names
    assert "maintenance_progress" in names, names
    order = seqs(page)
    assert order == sorted(set(order)), f"events not in seq order, or repeated: {order}"
    expect(complete).to_contain_text(json.dumps(message))  # its data, as compact JSON

    result = shown_result(page)
    assert result["success"] is True and result["data"]["pong"] == message, result
    expect(page.locator("#job-status")).to_have_text("succeeded")
    expect(job_row(page, job_id)).to_have_attribute("data-status", "succeeded", timeout=REFRESH_MS)


@pytest.mark.usefixtures("fresh_upstream_state")
def test_an_ai_jobs_text_grows_as_it_streams_and_ends_as_the_whole_answer(
    page, gateway, workers, llm_server, unique
):
    pieces = (*(f"piece{i}-{unique[:6]} " for i in range(15)), "<end> & done.")
    answer = "".join(pieces)
    llm_server.script(Reply.ok(chunks=pieces, chunk_delay_s=0.35))  # about 5.5 s of stream
    workers.start("ai", env=ai_env(llm_server))
    open_ui(page, gateway)
    # Every value #job-text takes, as the browser renders it.
    page.evaluate("""() => {
        window.jobTexts = [];
        const pre = document.getElementById("job-text");
        new MutationObserver(() => window.jobTexts.push(pre.textContent))
            .observe(pre, {childList: true, characterData: true, subtree: true});
    }""")

    response = page.request.post(
        f"{gateway.url}/api/v1/ai/generate",
        data={"prompt": f"count for {unique}"},
        headers=gateway.headers,
    )
    assert response.status == 202, response.text()
    job_id = response.json()["data"]["job_id"]

    job_row(page, job_id).click(timeout=REFRESH_MS)  # the row shows up; a click selects it
    expect(page.locator("#job")).to_have_attribute("data-job-id", job_id)
    expect(page.locator("#job-text")).to_have_text(answer, timeout=JOB_MS)
    expect(page.locator("#job-stream")).to_have_attribute("data-state", "ended", timeout=10_000)

    texts = [t for t in dict.fromkeys(page.evaluate("window.jobTexts")) if t]
    assert all(answer.startswith(t) for t in texts), f"not prefixes of the answer: {texts}"
    assert len(texts) >= 3, f"#job-text did not grow in steps as the answer streamed: {texts}"
    assert page.locator("#job-text *").count() == 0  # "<end>" stayed text, not markup
    result = shown_result(page)
    assert result["success"] is True and result["data"]["content"] == answer, result
    expect(job_row(page, job_id)).to_have_attribute("data-status", "succeeded", timeout=REFRESH_MS)


def test_a_dead_letter_retried_from_the_page_runs_again_as_a_new_job(
    page, gateway, workers, engine, redis_client, unique
):
    old_id = str(uuid.uuid4())
    message = f"second chance {unique}"
    row = {
        "job_id": old_id,
        "task": "maintenance.ping",
        "queue": "maintenance",
        "payload": {"message": message},
        "reason": "exhausted",
        "error": f"gave up after 3 attempts: <b>boom</b> {unique}",
        "attempts": 3,
    }
    if "tenant" in DeadLetter.__table__.c:  # once dead letters belong to tenants
        row["tenant"] = "dev"
    assert dead_letters.record(engine, redis_client, row)
    workers.start("maintenance")
    open_ui(page, gateway)

    letter = page.locator(f'#dead-letters-body tr[data-job-id="{old_id}"]')
    expect(letter).to_be_visible(timeout=REFRESH_MS)
    expect(letter).to_contain_text("maintenance.ping")
    expect(letter).to_contain_text("exhausted")
    expect(letter).to_contain_text(f"<b>boom</b> {unique}")  # shown as text ...
    assert letter.locator("b").count() == 0  # ... never as markup

    letter.get_by_role("button", name="Retry").click()
    new_link = letter.locator("td.resubmitted button.link")
    expect(new_link).to_be_visible(timeout=10_000)
    new_id = new_link.get_attribute("title")
    assert new_id and new_id != old_id
    expect(page.locator("#dl-status")).to_contain_text(new_id)
    expect(letter.get_by_role("button", name="Retry")).to_have_count(0)
    expect(page.locator("#job")).to_have_attribute("data-job-id", new_id)  # selected
    job_loaded(page)

    expect(job_row(page, new_id)).to_have_attribute("data-status", "succeeded", timeout=JOB_MS)
    expect(page.locator("#job-stream")).to_have_attribute("data-state", "ended", timeout=10_000)
    result = shown_result(page)
    assert result["success"] is True and result["data"]["pong"] == message, result

    page.reload()  # what the gateway kept: the letter names its new job
    expect(new_link).to_have_attribute("title", new_id, timeout=REFRESH_MS)


def test_a_job_whose_history_was_trimmed_shows_a_gap_note_then_what_remains(
    page, gateway, workers, redis_client, unique
):
    workers.start("maintenance")
    response = page.request.post(
        f"{gateway.url}/api/v1/jobs",
        data={"task": "maintenance.ping", "payload": {"message": unique, "hold_s": 1.5}},
        headers=gateway.headers,
    )
    assert response.status == 202, response.text()
    job_id = response.json()["data"]["job_id"]
    stream = keys.events_stream(job_id)
    open_ui(page, gateway)
    expect(job_row(page, job_id)).to_have_attribute("data-status", "succeeded", timeout=JOB_MS)
    events = redis_client.xlen(stream)
    assert events >= 3, f"a ping holding 1.5 s published {events} events"
    redis_client.xtrim(stream, maxlen=1, approximate=False)  # only the terminal event is left

    job_row(page, job_id).click()
    gap = page.locator("#job-gaps .gap")
    expect(gap).to_be_visible(timeout=10_000)
    expect(page.locator('#job-events li[data-type="complete"]')).to_have_count(1, timeout=10_000)
    [last] = seqs(page)
    assert gap.get_attribute("data-from-seq") == "1", gap.inner_text()
    assert gap.get_attribute("data-to-seq") == str(last - 1), gap.inner_text()
    expect(gap).to_contain_text(f" to {last - 1} were trimmed")
    expect(page.locator("#job-stream")).to_have_attribute("data-state", "ended")
    result = shown_result(page)
    assert result["success"] is True and result["data"]["pong"] == unique, result


def test_without_a_key_the_page_asks_for_one_and_with_it_follows_a_job_by_its_token(
    browser, keyed_gateway, workers, tmp_path, unique
):
    from tests.gateway.conftest import KEYS

    key = KEYS["ui"]
    workers.start("maintenance")
    with browsing(browser, keyed_gateway, tmp_path) as page:
        sent: list[tuple[str, str | None]] = []
        page.on("request", lambda r: sent.append((r.url, r.headers.get("authorization"))))
        page.goto(f"{keyed_gateway.url}/ui/")
        notice = page.locator("#auth-notice")
        expect(notice).to_be_visible()
        expect(notice).to_contain_text("401")
        expect(page.locator("#api-key")).to_be_focused()
        expect(page.locator("#jobs-error")).to_contain_text("401")

        page.fill("#api-key", "cvk_not_a_key_of_anyone")
        page.click("#key-form button[type=submit]")
        expect(notice).to_be_visible()

        page.fill("#api-key", key)
        page.click("#key-form button[type=submit]")
        expect(notice).to_be_hidden()
        expect(page.locator("#jobs-error")).to_be_hidden(timeout=REFRESH_MS)
        assert page.evaluate("sessionStorage.getItem('conveyor.apiKey')") == key

        page.fill("#ping-message", unique)
        page.fill("#ping-hold", "1")
        page.click("#submit-form button[type=submit]")
        expect(page.locator('#job-events li[data-type="complete"]')).to_have_count(
            1, timeout=JOB_MS
        )
        expect(page.locator("#job-stream")).to_have_attribute("data-state", "ended")
        result = shown_result(page)
        assert result["success"] is True and result["data"]["pong"] == unique, result

        api = [(url, auth) for url, auth in sent if "/api/v1/" in url]
        streams = [(url, auth) for url, auth in api if "/events" in url]
        assert streams and all("token=" in url and auth is None for url, auth in streams), streams
        calls = [auth for url, auth in api if "/events" not in url]
        assert f"Bearer {key}" in calls, calls
        assert key not in "".join(url for url, _ in sent), "the key went into a URL"
