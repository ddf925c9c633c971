"""workers/ai/prompts.py as plain functions: the messages each ai.* job sends, fenced code
read back from an answer, and an analysis answer checked against what was asked."""

from __future__ import annotations

import itertools
import json

import pytest

from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from workers.ai.prompts import (
    AnswerDoesNotFit,
    extract_code_blocks,
    messages_for,
    parse_analysis,
)
from workers.failures import Permanent

HISTORY = [
    {"role": "user", "content": "earlier question"},
    {"role": "assistant", "content": "earlier answer"},
]


def analyze(kind: str, **options) -> AnalyzePayload:
    return AnalyzePayload(text="The queue never loses a job.", kind=kind, **options)


# --- messages_for -------------------------------------------------------------------------------


def test_chat_keeps_the_messages_in_order_behind_system_and_history():
    payload = ChatPayload(
        system="Be terse.",
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "and now?"},
        ],
    )
    history = [dict(m) for m in HISTORY]

    messages = messages_for("ai.chat", payload, history)

    assert messages == [
        {"role": "system", "content": "Be terse."},
        *HISTORY,
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and now?"},
    ]
    assert history == HISTORY  # the caller's list is not changed
    assert messages_for("ai.chat", payload, history) == messages  # and not consumed


def test_chat_without_system_or_history_is_just_the_messages():
    payload = ChatPayload(messages=[{"role": "user", "content": "hi"}])
    assert messages_for("ai.chat", payload) == [{"role": "user", "content": "hi"}]
    assert messages_for("ai.chat", payload, []) == [{"role": "user", "content": "hi"}]


def test_generate_asks_the_prompt_as_the_user():
    assert messages_for("ai.generate", GeneratePayload(prompt="Write a haiku")) == [
        {"role": "user", "content": "Write a haiku"}
    ]
    with_system = messages_for(
        "ai.generate", GeneratePayload(prompt="Write a haiku", system="You are a poet."), HISTORY
    )
    assert with_system == [
        {"role": "system", "content": "You are a poet."},
        *HISTORY,
        {"role": "user", "content": "Write a haiku"},
    ]


def test_code_gets_a_default_system_asking_for_one_fenced_block():
    [system, user] = messages_for("ai.code", CodePayload(instruction="Sort a list"))
    assert system["role"] == "system"
    assert "```" in system["content"] and "code block" in system["content"]
    assert user == {"role": "user", "content": "Sort a list"}


def test_code_puts_language_and_the_existing_code_fenced_after_the_instruction():
    payload = CodePayload(
        instruction="Make it faster",
        language="python",
        code="def f(xs):\n    return sorted(xs)[0]",
        system="Only code.",
    )
    [system, user] = messages_for("ai.code", payload)
    assert system == {"role": "system", "content": "Only code."}  # the job's own wins
    assert user["content"] == (
        "Make it faster\n\nLanguage: python\n\n"
        "The code:\n```python\ndef f(xs):\n    return sorted(xs)[0]\n```"
    )
    # The code the model is shown can be read back with the same fence reader.
    assert extract_code_blocks(user["content"]) == [
        {"language": "python", "code": "def f(xs):\n    return sorted(xs)[0]"}
    ]


def test_code_without_language_fences_the_code_bare():
    payload = CodePayload(instruction="Explain", code="x = 1")
    content = messages_for("ai.code", payload)[-1]["content"]
    assert content == "Explain\n\nThe code:\n```\nx = 1\n```"
    assert "Language:" not in content


@pytest.mark.parametrize(
    ("kind", "options", "promised"),
    [
        ("summarize", {}, '{"summary":'),
        ("sentiment", {}, '"score": <number from -1 to 1>'),
        ("classify", {"labels": ["bug", "feature"]}, '"confidence": <number from 0 to 1>'),
        ("extract", {"fields": ["who"]}, "use null for a field"),
    ],
)
def test_analyze_asks_for_its_kind_then_gives_the_text(kind, options, promised):
    payload = analyze(kind, **options)
    [system, user] = messages_for("ai.analyze", payload, [])
    assert system["role"] == "system" and "JSON" in system["content"]
    assert user["role"] == "user"
    assert promised in user["content"]
    assert user["content"].endswith("\n\nThe text:\nThe queue never loses a job.")


def test_analyze_keeps_a_system_of_the_job_and_history():
    payload = analyze("summarize", system="Answer in French, as JSON.")
    messages = messages_for("ai.analyze", payload, HISTORY)
    assert messages[0] == {"role": "system", "content": "Answer in French, as JSON."}
    assert messages[1:3] == HISTORY
    assert messages[3]["role"] == "user"


@pytest.mark.parametrize(
    ("kind", "options", "names"),
    [
        ("classify", {"labels": ["bug", "feature request"]}, ['"bug"', '"feature request"']),
        ("extract", {"fields": ["invoice_no", "total"]}, ['"invoice_no"', '"total"']),
    ],
)
def test_analyze_names_the_labels_or_fields_it_wants(kind, options, names):
    ask = messages_for("ai.analyze", analyze(kind, **options))[-1]["content"]
    for name in names:
        assert name in ask
    assert "<labels>" not in ask and "<fields>" not in ask and "{{" not in ask


# --- extract_code_blocks ------------------------------------------------------------------------


def test_code_blocks_come_back_in_order_with_their_languages():
    text = (
        "Here it is:\n"
        "```python\nprint('a')\n\n```\n"
        "then the shell part:\n"
        "``` bash title=run.sh\necho hi\n```\n"
        "and one without a language:\n"
        "```\nplain\n```\n"
        "```c++\nint main() {}\n```"
    )
    assert extract_code_blocks(text) == [
        {"language": "python", "code": "print('a')"},  # trailing newlines dropped
        {"language": "bash", "code": "echo hi"},  # spaces and fence info after it ignored
        {"language": "", "code": "plain"},
        {"language": "c++", "code": "int main() {}"},
    ]


def test_code_keeps_inner_blank_lines_and_indentation():
    code = "def f():\n\n    return 1\n  # end"
    assert extract_code_blocks(f"```py\n{code}\n```") == [{"language": "py", "code": code}]


@pytest.mark.parametrize(
    "text",
    ["no code here", "```python\nnever closed", "inline `code` only", ""],
)
def test_no_complete_fence_means_no_block(text):
    assert extract_code_blocks(text) == []


# Without hypothesis installed, a small exhaustive product stands in for a property test:
# any block written as ```<lang>\n<code>\n``` between prose is read back exactly.
_LANGS = ["", "python", "c#", "objective-c", "c++", "node.js"]
_CODES = ["x", "a = 1\nb = 2", "  indented\n\n\ttabbed", "print('`')", "ünïcode → ok"]
_PROSE = ["", "Sure!\n", "Text before.\n\n"]


@pytest.mark.parametrize(("lang", "code", "prose"), list(itertools.product(_LANGS, _CODES, _PROSE)))
def test_any_written_block_is_read_back(lang, code, prose):
    text = f"{prose}```{lang}\n{code}\n```\n{prose}```{lang}\n{code[::-1]}\n```"
    assert extract_code_blocks(text) == [
        {"language": lang, "code": code},
        {"language": lang, "code": code[::-1]},
    ]


# --- parse_analysis -----------------------------------------------------------------------------


def test_summary_is_read_from_bare_json_and_prose_around_it():
    payload = analyze("summarize")
    assert parse_analysis(payload, '{"summary": "It is reliable."}') == {
        "summary": "It is reliable."
    }
    wrapped = 'Sure! Here you go: {"summary": "It is {reliable}.", "extra": 1} Hope it helps.'
    assert parse_analysis(payload, wrapped) == {"summary": "It is {reliable}."}  # extras dropped


def test_json_in_a_fenced_block_is_read_from_the_block():
    payload = analyze("summarize")
    text = 'Answer:\n```json\n{"summary": "fenced"}\n```\nAlso {"summary": "not this"}'
    assert parse_analysis(payload, text) == {"summary": "fenced"}


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"label": "positive", "score": 1}, {"label": "positive", "score": 1.0}),
        ({"label": "negative", "score": -1}, {"label": "negative", "score": -1.0}),
        ({"label": "neutral", "score": 0.25}, {"label": "neutral", "score": 0.25}),
    ],
)
def test_sentiment_fits(answer, expected):
    result = parse_analysis(analyze("sentiment"), json.dumps(answer))
    assert result == expected
    assert type(result["score"]) is float


@pytest.mark.parametrize(
    ("answer", "lacking"),
    [
        ({"label": "happy", "score": 0.5}, "'label' of positive, negative or neutral"),
        ({"score": 0.5}, "'label' of positive"),
        ({"label": "positive", "score": 1.5}, "a numeric 'score' from -1 to 1"),
        ({"label": "positive", "score": "0.5"}, "a numeric 'score'"),
        ({"label": "positive", "score": True}, "a numeric 'score'"),  # a bool is no number
        ({"label": "positive"}, "a numeric 'score'"),
    ],
)
def test_sentiment_that_does_not_fit(answer, lacking):
    text = json.dumps(answer)
    with pytest.raises(AnswerDoesNotFit) as caught:
        parse_analysis(analyze("sentiment"), text)
    assert lacking in str(caught.value)
    assert text in str(caught.value)  # the model's text is in the error


def test_classify_takes_only_a_given_label_and_checks_confidence():
    payload = analyze("classify", labels=["bug", "feature"])
    assert parse_analysis(payload, '{"label": "bug"}') == {"label": "bug"}
    assert parse_analysis(payload, '{"label": "feature", "confidence": 1}') == {
        "label": "feature",
        "confidence": 1.0,
    }
    assert parse_analysis(payload, '{"label": "bug", "confidence": null}') == {"label": "bug"}
    with pytest.raises(AnswerDoesNotFit, match=r"'label' one of \['bug', 'feature'\]"):
        parse_analysis(payload, '{"label": "Bug", "confidence": 0.9}')
    with pytest.raises(AnswerDoesNotFit, match="'confidence' from 0 to 1"):
        parse_analysis(payload, '{"label": "bug", "confidence": 90}')
    with pytest.raises(AnswerDoesNotFit, match="'confidence' from 0 to 1"):
        parse_analysis(payload, '{"label": "bug", "confidence": "high"}')


def test_extract_returns_exactly_the_asked_fields_nulls_included():
    payload = analyze("extract", fields=["who", "when"])
    answer = '{"when": null, "who": "ops", "why": "ignored"}'
    assert parse_analysis(payload, answer) == {"fields": {"who": "ops", "when": None}}
    with pytest.raises(AnswerDoesNotFit, match=r"the fields \['when'\]"):
        parse_analysis(payload, '{"who": "ops"}')


@pytest.mark.parametrize(
    "text",
    [
        "I cannot summarize that.",
        "",
        '["summary", "a list"]',
        '{"summary": "unterminated"',
        '} {"summary": "x"',
        "{not json at all}",
        '```python\nprint("no json here")\n```\n{"summary": "after the block"}',
    ],
)
def test_an_answer_that_is_no_json_object_does_not_fit(text):
    with pytest.raises(AnswerDoesNotFit, match="did not answer with a JSON object"):
        parse_analysis(analyze("summarize"), text)


def test_summary_must_be_a_string():
    with pytest.raises(AnswerDoesNotFit, match="a string 'summary'"):
        parse_analysis(analyze("summarize"), '{"summary": ["a", "b"]}')


def test_does_not_fit_is_a_permanent_failure_and_clips_long_answers():
    assert issubclass(AnswerDoesNotFit, Permanent)
    assert AnswerDoesNotFit.reason == "invalid_answer"
    long_text = "no json " * 200
    with pytest.raises(AnswerDoesNotFit) as caught:
        parse_analysis(analyze("summarize"), long_text)
    message = str(caught.value)
    assert message.endswith("…")
    assert long_text[:300] in message
    assert long_text[:301] not in message
