"""The OpenAPI document: FastAPI's, plus the payload schemas of the task routes (their bodies
are read raw, so FastAPI does not see the models), the envelope every answer uses, and every
status each route answers with (docs/gateway.md's table of errors).

Routes declare what they answer with ``answers(...)`` (their success) and ``refusals(...)``
(their errors), on the router for what all of its routes share; ``app`` adds every route's
413 (the body limit is the app's). ``install`` then adds what holds for every route: the
``X-Request-ID`` header of every answer and the request headers every route reads
(``X-Request-ID``, ``traceparent``). It drops FastAPI's own 422 "Validation Error": a request
FastAPI finds invalid is answered 400, in the envelope (``responses.install_error_handlers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, Literal, TypeVar

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

REF = "#/components/schemas/{model}"
_registered: dict[str, type[BaseModel]] = {}
_replaced: dict[str, Callable[[], dict[str, Any]]] = {}

#: ``responses=`` of a FastAPI route or router: status -> its response object.
Responses = dict[int | str, dict[str, Any]]

_TIMESTAMP = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$"
_REQUEST_ID = r"^[\x21-\x7e]{1,200}$"

Timestamp = Annotated[str, Field(pattern=_TIMESTAMP, description="UTC, to the millisecond")]
RequestId = Annotated[
    str, Field(pattern=_REQUEST_ID, description="the caller's X-Request-ID, or one made")
]
DataT = TypeVar("DataT")


class Success(BaseModel, Generic[DataT]):
    """The envelope of a success (docs/gateway.md, Envelope): ``error`` is null."""

    model_config = ConfigDict(extra="forbid")

    success: Literal[True]
    data: DataT
    error: None
    timestamp: Timestamp
    request_id: RequestId


class Envelope(Success[dict[str, Any]]):
    """Every JSON answer: ``{success, data, error, timestamp, request_id}``; this one a
    success."""


class Failure(BaseModel, Generic[DataT]):
    """The envelope of an error: ``error`` says what is wrong, for people; ``data`` may say
    more."""

    model_config = ConfigDict(extra="forbid")

    success: Literal[False]
    data: DataT
    error: str
    timestamp: Timestamp
    request_id: RequestId


class ErrorData(BaseModel):
    model_config = ConfigDict(extra="forbid")

    down: list[str] = Field(
        default_factory=list, description="GET /ready's 503: what is unreachable"
    )
    resubmitted_job_id: str | None = Field(
        default=None, description="a dead letter's 409: the job it was re-submitted as"
    )


class ErrorEnvelope(Failure[ErrorData]):
    """An error other than a 400."""


class Problems(BaseModel):
    model_config = ConfigDict(extra="forbid")

    problems: list[str] = Field(
        min_length=1, description="every bad field (or header, or the body), as `path: message`"
    )


class InvalidRequest(Failure[Problems]):
    """A 400: ``data.problems`` names every bad field."""


class JobLinks(BaseModel):
    model_config = ConfigDict(extra="forbid")

    self: str
    events: str
    result: str


class AcceptedJob(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    task: str
    status: Literal["queued"]
    duplicate: bool = Field(description="the Idempotency-Key's earlier job: nothing enqueued")
    events_token: str = Field(description="follows this job's events without an API key")
    links: JobLinks


class JobAccepted(Success[AcceptedJob]):
    """A submit's 202."""


class AcceptedJobs(BaseModel):
    model_config = ConfigDict(extra="forbid")

    jobs: list[AcceptedJob] = Field(description="in the batch's order")


class BatchAccepted(Success[AcceptedJobs]):
    """A batch's 202."""


class CancelAsked(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: str
    cancel: Literal["running", "not started"]


class CancelAccepted(Success[CancelAsked]):
    """A cancel's 202."""


#: What each error status means, unless a route says more precisely.
ERRORS: dict[int, str] = {
    400: "invalid request: data.problems names every bad field",
    401: "no or unknown API key",
    403: "a token used beyond its job",
    404: "no such job (or another tenant's)",
    409: "conflict with the job's state",
    413: "the request body is over the gateway's limit",
    422: "the Idempotency-Key was used for another body",
    429: "the key's rate limit is reached; nothing was enqueued (Retry-After)",
    503: "the broker, Redis or the database is unreachable (Retry-After)",
}

_RETRY_AFTER = {
    "description": "seconds to wait before retrying",
    "required": True,
    "schema": {"type": "integer", "minimum": 1},
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {
        "WWW-Authenticate": {
            "description": "the scheme to authenticate with",
            "required": True,
            "schema": {"type": "string"},
        }
    },
    429: {"Retry-After": _RETRY_AFTER},
    503: {"Retry-After": _RETRY_AFTER},
}


def refusals(*statuses: int | tuple[int, str]) -> Responses:
    """``responses=`` for errors, each in the envelope: a status (with its meaning in
    ``ERRORS``) or ``(status, what it means here)``."""
    declared: Responses = {}
    for entry in statuses:
        status, description = entry if isinstance(entry, tuple) else (entry, ERRORS[entry])
        model = InvalidRequest if status == 400 else ErrorEnvelope
        declared[status] = {"model": model, "description": description}
        if status in _HEADERS:
            declared[status]["headers"] = dict(_HEADERS[status])
    return declared


def answers(
    model: type[Success[Any]] = Envelope,
    status: int = 200,
    description: str = "the envelope, success true",
    *,
    location: bool = False,
) -> Responses:
    """``responses=`` for a route's success; ``location``: it names the new job's URL."""
    declared: dict[str, Any] = {"model": model, "description": description}
    if location:
        declared["headers"] = {
            "Location": {
                "description": "the job's URL",
                "required": True,
                "schema": {"type": "string"},
            }
        }
    return {status: declared}


def reference(model: type[BaseModel]) -> str:
    """A ``$ref`` to ``model``'s schema, which the document then holds."""
    _registered[model.__name__] = model
    return REF.format(model=model.__name__)


def payload_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``'s."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": reference(model)}}},
        }
    }


def document_as(name: str, schema: Callable[[], dict[str, Any]]) -> None:
    """The component ``name`` (a request model of FastAPI's) is ``schema()`` in the document
    (made with it, so it can tell this process's settings): what the route checks beyond the
    model. Its refs are ``reference``'s."""
    _replaced[name] = schema


#: Request headers every route reads (middleware.Correlation).
_REQUEST_HEADERS: list[dict[str, Any]] = [
    {
        "name": "X-Request-ID",
        "in": "header",
        "required": False,
        "description": "1-200 printable ASCII characters (else one is made); travels with "
        "the job and is echoed in the answer",
        "schema": {"type": "string"},
    },
    {
        "name": "traceparent",
        "in": "header",
        "required": False,
        "description": "W3C trace context (a malformed one starts a new trace)",
        "schema": {"type": "string"},
    },
]
_REQUEST_ID_HEADER = {
    "description": "the request id of the envelope",
    "required": True,
    "schema": {"type": "string", "pattern": _REQUEST_ID},
}
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def _complete(document: dict[str, Any]) -> None:
    """What holds for every route, whatever it declares (see the module's docstring)."""
    for methods in document.get("paths", {}).values():
        for operation in methods.values():
            responses = operation.setdefault("responses", {})
            fastapi_422 = responses.get("422", {}).get("content", {}).get("application/json", {})
            if fastapi_422.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            for response in responses.values():
                response["headers"] = {
                    **response.get("headers", {}),
                    "X-Request-ID": _REQUEST_ID_HEADER,
                }
            parameters = operation.setdefault("parameters", [])
            named = {p.get("name", "").lower() for p in parameters}
            parameters += [h for h in _REQUEST_HEADERS if h["name"].lower() not in named]
    schemas = document.get("components", {}).get("schemas", {})
    for name in _VALIDATION_SCHEMAS:
        schemas.pop(name, None)


def install(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        document = get_openapi(
            title="Conveyor gateway",
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        replaced = {name: build() for name, build in _replaced.items()}  # may register models
        for name, model in _registered.items():
            schema = model.model_json_schema(ref_template=REF)
            for def_name, definition in schema.pop("$defs", {}).items():
                schemas.setdefault(def_name, definition)
            schemas[name] = schema
        schemas.update(replaced)
        _complete(document)
        app.openapi_schema = document
        return document

    app.openapi = openapi  # type: ignore[method-assign]
