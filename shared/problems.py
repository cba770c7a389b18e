"""RFC 9457 problem details: the one error body of every service (DESIGN §4, "Errors, on every service").

Every 4xx and 5xx is ``application/problem+json`` ``{type, title, status, detail, errors:
[{field, rule, message}]}``. ``field`` is a dotted path of the input that was refused
(``body.address``, ``query.limit``, ``path.account_id``, ``header.If-Match``) or the state that
refused it (``allowlist.entries``); ``rule`` names the rule (a pydantic error type such as
``string_pattern_mismatch``, or ours such as ``private`` or ``max_endpoints``).

Domain errors carry no HTTP status: each service's ``api.py`` maps them once with an
``ErrorMapping`` (status, title, field, rule), which installs the handlers and gives each route
its documented ``responses=``. The request-level problems (401, 400, 404, 405, 413, 415, 422,
500) are mapped here by ``install_problem_handlers``; ``document_problems`` adds the statuses
every route shares (401/403 for a route behind a token, 400/413/415 for a body, 422 for any
input, 503) to the OpenAPI document, so a new route gets them without writing them.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:hostiso:problem:"


class ProblemItem(BaseModel):
    """One refused input: where, which rule, and what to do."""

    field: str = Field(
        description="Dotted path of the refused input (body.address, query.limit, "
        "path.account_id, header.If-Match) or of the state that refused it.",
        examples=["body.address"],
    )
    rule: str = Field(
        description="The rule: a pydantic error type or the service's own rule name.",
        examples=["private"],
    )
    message: str = Field(
        description="What is wrong and what to do, for a person.",
        examples=["192.168.1.10 is a private address; use the server's public address"],
    )


class Problem(BaseModel):
    """RFC 9457 problem details; ``errors`` names each refused field and its rule."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(
        "about:blank",
        description="URI of the problem kind: urn:hostiso:problem:<field>.<rule>, or about:blank.",
        examples=["urn:hostiso:problem:address.private"],
    )
    title: str = Field(description="Short summary of the kind.", examples=["Invalid input"])
    status: int = Field(description="The HTTP status code.", examples=[422])
    detail: str = Field(description="This occurrence, for a person.", examples=["address: ..."])
    errors: list[ProblemItem] = Field(
        default_factory=list, description="Each refused field and its rule (may be empty)."
    )


def problem_body(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    errors: Iterable[ProblemItem | Mapping[str, str]] = (),
    type_: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object of a problem document."""
    items = [item.model_dump() if isinstance(item, ProblemItem) else dict(item) for item in errors]
    if type_ is None:
        type_ = (
            f"{TYPE_PREFIX}{_bare(items[0]['field'])}.{items[0]['rule']}"
            if len(items) == 1 and items[0]["field"]
            else "about:blank"
        )
    body: dict[str, Any] = {
        "type": type_,
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
        "errors": items,
    }
    body.update(extensions or {})
    return body


def problem_response(
    status: int,
    detail: str,
    *,
    title: str | None = None,
    errors: Iterable[ProblemItem | Mapping[str, str]] = (),
    headers: Mapping[str, str] | None = None,
    type_: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> JSONResponse:
    """A problem+json response."""
    return JSONResponse(
        problem_body(
            status, detail, title=title, errors=errors, type_=type_, extensions=extensions
        ),
        status_code=status,
        headers=dict(headers or {}),
        media_type=PROBLEM_JSON,
    )


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


_LOCATIONS = ("body.", "query.", "path.", "header.")


def _bare(path: str) -> str:
    for prefix in _LOCATIONS:
        if path.startswith(prefix):
            return path[len(prefix) :]
    return path


class InputRejectedError(Exception):
    """A route's own check of its input failed (422): the field and the rule it broke."""

    def __init__(self, field: str, rule: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.rule = rule
        self.message = message


# --- domain errors -> problems (one table per service, in its api.py) ---------------------


@dataclass(frozen=True)
class ProblemKind:
    """How one kind of domain error answers: status, title, and the field and rule it names.

    The error's own ``field``, ``rule`` and ``message`` attributes win over these defaults; an
    error with neither whose message reads ``"field: ..."`` names that field. An error with a
    ``retry_after_s`` attribute gets a ``Retry-After`` header (else ``retry_after``, if set).
    """

    status: int
    title: str
    description: str
    field: str = ""
    rule: str = ""
    retry_after: int | None = None
    model: type[Problem] = Problem
    log_level: int | None = None


_NAMED_FIELD = re.compile(r"^(?P<field>[A-Za-z_][A-Za-z0-9_.-]*): ")


@dataclass
class ErrorMapping:
    """A service's domain errors mapped once to problem kinds.

    ``fields`` turns a domain field name into its wire path (``"address"`` ->
    ``"body.address"``); ``everywhere`` are the errors any route may raise (the store or the
    event log unavailable): they are documented on every route of the service.
    """

    kinds: Mapping[type[Exception], ProblemKind]
    fields: Mapping[str, str] = field(default_factory=dict)
    everywhere: tuple[type[Exception], ...] = ()

    def kind_of(self, error: BaseException) -> ProblemKind:
        for cls in type(error).__mro__:
            kind = self.kinds.get(cls)
            if kind is not None:
                return kind
        raise KeyError(type(error).__name__)

    def item(self, error: BaseException, kind: ProblemKind) -> ProblemItem | None:
        message = str(getattr(error, "message", None) or error)
        name = str(getattr(error, "field", "") or kind.field)
        rule = str(getattr(error, "rule", "") or kind.rule)
        if not name:
            named = _NAMED_FIELD.match(message)
            if named is None:
                return None
            name = named["field"]
        return ProblemItem(
            field=self.fields.get(name, name), rule=rule or "refused", message=message
        )

    def response(self, error: BaseException) -> JSONResponse:
        kind = self.kind_of(error)
        if kind.log_level is not None:
            log.log(kind.log_level, "answered %d: %r", kind.status, error)
        item = self.item(error, kind)
        headers: dict[str, str] = {}
        retry_after = getattr(error, "retry_after_s", None)
        if retry_after is None:
            retry_after = kind.retry_after
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        # An infrastructure error's text would leak internals: its kind's description says it.
        detail = kind.description if kind.status >= 500 else str(item.message if item else error)
        return problem_response(
            kind.status,
            detail,
            title=kind.title,
            errors=[item] if item is not None and kind.status < 500 else [],
            headers=headers,
        )

    def install(self, app: FastAPI) -> None:
        """Register the handler of every mapped error, and the errors any route may raise."""

        async def handle(request: Request, error: Exception) -> JSONResponse:
            return self.response(error)

        for error_type in self.kinds:
            app.add_exception_handler(error_type, handle)
        shared = getattr(app.state, "problem_responses_everywhere", {})
        app.state.problem_responses_everywhere = {**shared, **self.responses(*self.everywhere)}

    def responses(self, *errors: type[Exception]) -> dict[int | str, dict[str, Any]]:
        """The ``responses=`` of a route that may raise ``errors`` (several per status merge)."""
        out: dict[int | str, dict[str, Any]] = {}
        for error_type in errors:
            kind = self.kinds.get(error_type) or next(
                k for t, k in self.kinds.items() if issubclass(error_type, t)
            )
            documented = out.get(kind.status)
            if documented is None:
                # 429 and 503 always say when to retry (the error's own retry_after_s or the kind's).
                retry = (
                    kind.retry_after
                    if kind.retry_after is not None
                    else (0 if kind.status in (429, 503) else None)
                )
                out[kind.status] = problem_doc(kind.description, kind.model, retry)
            elif kind.description not in documented["description"]:
                documented["description"] += f"; {kind.description}"
        return out


def problem_doc(
    description: str, model: type[Problem] = Problem, retry_after: int | None = None
) -> dict[str, Any]:
    """One documented problem response (``model`` registers its schema with FastAPI); with
    ``retry_after`` set, its ``Retry-After`` header is documented too."""
    doc: dict[str, Any] = {"description": description, "model": model}
    if retry_after is not None:
        doc["headers"] = {"Retry-After": _RETRY_AFTER}
    return doc


_RETRY_AFTER = {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}


# --- request-level problems, the same on every service ----------------------------------


def _validation_items(exc: RequestValidationError) -> list[ProblemItem]:
    items = []
    for error in exc.errors():
        loc = [str(part) for part in error.get("loc", ())]
        items.append(
            ProblemItem(
                field=".".join(loc) or "body",
                rule=str(error.get("type", "invalid")),
                message=str(error.get("msg", "invalid")),
            )
        )
    return items


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def _validation_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    items = _validation_items(exc)
    if any(item.rule == "json_invalid" for item in items):
        return problem_response(
            400,
            "request body: not a JSON document",
            title="Undecodable body",
            errors=[ProblemItem(field="body", rule="json_invalid", message="not a JSON document")],
        )
    content_type = request.headers.get("content-type", "")
    body_refused = any(item.field == "body" for item in items)
    if body_refused and content_type and not _is_json(content_type):
        return problem_response(
            415,
            f"request body: must be application/json, not {content_type[:60]}",
            errors=[
                ProblemItem(
                    field="header.Content-Type", rule="json", message="send application/json"
                )
            ],
        )
    detail = "; ".join(f"{item.field}: {item.message}" for item in items) or "invalid request"
    return problem_response(422, detail, title="Invalid input", errors=items)


async def _input_rejected(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, InputRejectedError)
    item = ProblemItem(field=exc.field, rule=exc.rule, message=exc.message)
    return problem_response(
        422, f"{exc.field}: {exc.message}", title="Invalid input", errors=[item]
    )


def _allowed_methods(request: Request) -> list[str]:
    # From the app's OpenAPI paths: GET and POST of one path are separate routes, so the route
    # that raised the 405 knows only its own methods.
    path = request.url.path
    methods: set[str] = set()
    for template, operations in request.app.openapi().get("paths", {}).items():
        regex, _, _ = compile_path(template)
        if regex.match(path):
            methods.update(m.upper() for m in operations if m in _METHODS)
    return sorted(methods)


_METHODS = ("get", "put", "post", "delete", "patch")


async def _http_problem(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers or {})
    status = exc.status_code
    detail = exc.detail if isinstance(exc.detail, str) else _phrase(status)
    errors: list[ProblemItem] = []
    if status == 405:
        allowed = _allowed_methods(request)
        headers["Allow"] = ", ".join(allowed)
        detail = f"method {request.method} not allowed here; allowed: {headers['Allow']}"
    elif status == 404 and detail == _phrase(404):
        detail = f"no route {request.url.path}"
    elif status == 401:
        errors = [ProblemItem(field="header.Authorization", rule="bearer_token", message=detail)]
    elif status == 403 and "scope" in detail:
        errors = [ProblemItem(field="header.Authorization", rule="scope", message=detail)]
    if status == 204 or status == 304 or status < 400:
        return JSONResponse(None, status_code=status, headers=headers)
    return problem_response(status, detail, errors=errors, headers=headers)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    # Never the exception's text: it may hold internals. The traceback goes to the log.
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "internal error; it is logged, retry later")


def install_problem_handlers(app: FastAPI) -> None:
    """The problem+json answers every service shares (validation, HTTP errors, 500)."""
    app.add_exception_handler(RequestValidationError, _validation_problem)
    app.add_exception_handler(InputRejectedError, _input_rejected)
    app.add_exception_handler(StarletteHTTPException, _http_problem)
    app.add_exception_handler(Exception, _server_error)


# --- OpenAPI: the statuses every route shares ------------------------------------------

_REF = "#/components/schemas/{model}"


def _problem_content(schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {PROBLEM_JSON: {"schema": schema or {"$ref": _REF.format(model="Problem")}}}


def _shared_response(description: str, **headers: dict[str, Any]) -> dict[str, Any]:
    doc: dict[str, Any] = {"description": description, "content": _problem_content()}
    if headers:
        doc["headers"] = headers
    return doc


def document_problems(
    document: dict[str, Any],
    *,
    authenticated: Callable[[str, str], bool],
    everywhere: Mapping[int | str, dict[str, Any]],
    operational: Iterable[str] = (),
) -> dict[str, Any]:
    """Add the shared problem statuses to every operation and serve every error as problem+json.

    ``authenticated(method, path)`` says whether a route sits behind a token (401, 403);
    ``everywhere`` are the documented responses of errors any route may raise (its 503);
    ``operational`` paths (probes, metrics) get neither.
    """
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (ProblemItem, Problem):
        schema = model.model_json_schema(ref_template=_REF)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    probes = set(operational)
    for path, item in document.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses: dict[str, Any] = operation.setdefault("responses", {})
            shared: dict[str, dict[str, Any]] = {}
            has_input = bool(operation.get("parameters")) or "requestBody" in operation
            if "requestBody" in operation:
                shared["400"] = _shared_response("The body is not a JSON document")
                shared["413"] = _shared_response("The body is over the limit (refused unread)")
                shared["415"] = _shared_response("The body is not application/json")
            if has_input:
                shared["422"] = _shared_response("Invalid input: each field and rule in errors")
            if authenticated(method.upper(), path):
                www = {"description": "Bearer", "schema": {"type": "string"}}
                shared["401"] = _shared_response(
                    "Missing, expired or forged bearer token", **{"WWW-Authenticate": www}
                )
                shared["403"] = _shared_response("The token may not do this")
            if path not in probes:
                for status, doc in everywhere.items():
                    shared[str(status)] = {
                        "description": doc["description"],
                        "content": _problem_content(),
                        **({"headers": doc["headers"]} if "headers" in doc else {}),
                    }
            for status, doc in shared.items():
                if status in responses:
                    known = responses[status].get("description", "")
                    if doc["description"] not in known:
                        responses[status]["description"] = f"{known}; {doc['description']}"
                else:
                    responses[status] = doc
            for status, doc in responses.items():
                if status.isdigit() and int(status) >= 400:
                    content: dict[str, Any] = doc.get("content") or {}
                    found: dict[str, Any] = next(iter(content.values()), {})
                    own: dict[str, Any] | None = found.get("schema")
                    if not own or own.get("$ref", "").endswith("/HTTPValidationError"):
                        own = None
                    doc["content"] = _problem_content(own)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document
