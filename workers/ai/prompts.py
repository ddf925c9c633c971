"""What the four ``ai.*`` jobs send a model, and how their answers are read back.

Plain functions: a payload in, chat messages out; a model's text in, structured data out. An
answer that does not fit what was asked (``ai.analyze`` wants JSON of a given shape) is an
error with the model's text in it, never a silent pass.
"""

from __future__ import annotations

import json
import re
from typing import Any

from conveyor.schemas.ai import AnalyzePayload, ChatPayload, CodePayload, GeneratePayload
from workers.failures import Permanent

Message = dict[str, str]


class AnswerDoesNotFit(Permanent):
    """The model answered, but not in the shape the job asked for."""

    reason = "invalid_answer"


_CODE_SYSTEM = (
    "You are a careful programmer. Answer with the complete code in one fenced code block "
    "(```language ... ```), followed by at most a short explanation."
)

_ANALYZE_SYSTEM = "You analyse text. Answer with one JSON object and nothing else."

_ANALYZE_TASKS = {
    "summarize": 'Summarize the text. Answer as {"summary": "<summary>"}.',
    "sentiment": (
        'Classify the sentiment of the text. Answer as {"label": "positive"|"negative"|'
        '"neutral", "score": <number from -1 to 1>}.'
    ),
    "classify": "Classify the text as exactly one of these labels: <labels>. Answer as "
    '{"label": "<one label>", "confidence": <number from 0 to 1>}.',
    "extract": "Extract these fields from the text: <fields>. Answer as a JSON object with "
    "exactly those keys; use null for a field the text does not give.",
}


def messages_for(task: str, payload: Any, history: list[Message] | None = None) -> list[Message]:
    """The chat messages for one job: its system prompt, recalled history, then the ask."""
    system = payload.system
    if isinstance(payload, ChatPayload):
        asked = [{"role": m.role, "content": m.content} for m in payload.messages]
    elif isinstance(payload, GeneratePayload):
        asked = [{"role": "user", "content": payload.prompt}]
    elif isinstance(payload, CodePayload):
        system = system or _CODE_SYSTEM
        parts = [payload.instruction]
        if payload.language:
            parts.append(f"Language: {payload.language}")
        if payload.code:
            fence = payload.language or ""
            parts.append(f"The code:\n```{fence}\n{payload.code}\n```")
        asked = [{"role": "user", "content": "\n\n".join(parts)}]
    elif isinstance(payload, AnalyzePayload):
        system = system or _ANALYZE_SYSTEM
        ask = (
            _ANALYZE_TASKS[payload.kind]
            .replace("<labels>", ", ".join(json.dumps(label) for label in payload.labels))
            .replace("<fields>", ", ".join(json.dumps(f) for f in payload.fields))
        )
        asked = [{"role": "user", "content": f"{ask}\n\nThe text:\n{payload.text}"}]
    else:  # pragma: no cover - the schemas registry and this function are kept together
        raise TypeError(f"no prompt for {task}")
    head = [{"role": "system", "content": system}] if system else []
    return head + list(history or []) + asked


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code_blocks(text: str) -> list[dict[str, str]]:
    """Fenced code blocks in order, each with its language (maybe empty) and code."""
    return [{"language": lang, "code": code.rstrip("\n")} for lang, code in _FENCE.findall(text)]


def parse_analysis(payload: AnalyzePayload, text: str) -> dict[str, Any]:
    """The model's JSON answer, checked against what ``payload.kind`` asked for."""
    value = _json_object(text)
    kind = payload.kind
    if kind == "summarize":
        _require(isinstance(value.get("summary"), str), "a string 'summary'", text)
        return {"summary": value["summary"]}
    if kind == "sentiment":
        label, score = value.get("label"), value.get("score")
        _require(
            label in ("positive", "negative", "neutral"),
            "'label' of positive, negative or neutral",
            text,
        )
        _require(
            isinstance(score, int | float) and _number(score) and -1 <= score <= 1,
            "a numeric 'score' from -1 to 1",
            text,
        )
        assert isinstance(score, int | float)
        return {"label": label, "score": float(score)}
    if kind == "classify":
        label, confidence = value.get("label"), value.get("confidence")
        _require(label in payload.labels, f"'label' one of {payload.labels}", text)
        result: dict[str, Any] = {"label": label}
        if confidence is not None:
            _require(
                _number(confidence) and 0 <= confidence <= 1,
                "a numeric 'confidence' from 0 to 1",
                text,
            )
            result["confidence"] = float(confidence)
        return result
    missing = [f for f in payload.fields if f not in value]
    _require(not missing, f"the fields {missing}", text)
    return {"fields": {f: value[f] for f in payload.fields}}


def _json_object(text: str) -> dict[str, Any]:
    candidate = text.strip()
    blocks = extract_code_blocks(candidate)
    if blocks:
        candidate = blocks[0]["code"]
    start, end = candidate.find("{"), candidate.rfind("}")
    try:
        value = json.loads(candidate[start : end + 1]) if start >= 0 < end else None
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise AnswerDoesNotFit(f"the model did not answer with a JSON object: {_clip(text)}")
    return value


def _require(ok: bool, what: str, text: str) -> None:
    if not ok:
        raise AnswerDoesNotFit(f"the model's answer lacks {what}: {_clip(text)}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
