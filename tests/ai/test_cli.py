"""Issue 3's "done when", typed as a user would: ``conveyor submit ai.chat ... --follow --wait``
streams the answer as events and ends with a complete event and a success envelope, against an
OpenAI-compatible endpoint set by three variables, and with nothing set, on the local echo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.fakes.llm_server import FakeLLMServer, Reply
from tests.support.ai import fresh_upstream_state  # noqa: F401
from workers.ai.providers.local import LABEL

pytestmark = pytest.mark.usefixtures("fresh_upstream_state")

MESSAGES = {"messages": [{"role": "user", "content": "hi there"}]}


def submit_and_follow() -> tuple[int, list[dict]]:
    argv = ["submit", "ai.chat", "--data", json.dumps(MESSAGES), "--follow", "--wait"]
    done = subprocess.run(
        [sys.executable, "-m", "workers.cli", *argv, "--timeout", "60"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        timeout=90,
    )
    lines = done.stdout.splitlines()
    return done.returncode, [json.loads(line) for line in lines[1:]]  # first: the job id


def check_streamed(printed: list[dict], content: str) -> None:
    *events, envelope = printed
    names = [e["event"] for e in events]
    assert names[0] == "ai_generation_start" and names[-1] == "ai_generation_complete"
    deltas = [e["data"]["delta"] for e in events if e["event"] == "ai_generation_progress"]
    assert deltas and "".join(deltas) == content
    assert events[-1]["type"] == "complete" and events[-1]["data"]["content"] == content
    assert envelope["success"] is True and envelope["data"]["content"] == content


def test_three_variables_and_an_openai_compatible_endpoint(workers):
    with FakeLLMServer() as llm:
        llm.default = Reply.ok("Streaming from the endpoint.", chunk_delay_s=0.15)
        workers.start(
            "ai",
            env={"LLM_BASE_URL": llm.openai_url, "LLM_API_KEY": "sk-x", "LLM_MODEL": "m-1"},
        )
        code, printed = submit_and_follow()
        assert code == 0, printed
        check_streamed(printed, "Streaming from the endpoint.")
        assert printed[-1]["data"]["provider"] == "default"
        assert [r.body["model"] for r in llm.requests] == ["m-1"]


def test_nothing_configured_answers_with_the_local_echo(workers):
    env = {name: "" for name in ("LLM_BASE_URL", "LLM_API_KEY", "LLM_MODEL", "LLM_PROVIDER")}
    workers.start("ai", env=env)
    code, printed = submit_and_follow()
    assert code == 0, printed
    content = printed[-1]["data"]["content"]
    assert content.startswith(LABEL) and "there hi" in content
    check_streamed(printed, content)
    assert printed[-1]["data"]["provider"] == "local"
