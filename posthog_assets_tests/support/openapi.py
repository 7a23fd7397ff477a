"""Contract checks against PostHog's published OpenAPI schema (November 2025).

The schema is ``data/posthog-openapi-subset.yaml`` beside this module: the paths the package and
the stand-in use, cut from PostHog's full schema (its header says where that came from;
``data/make_openapi_subset.py`` regenerates it). ``POSTHOG_OPENAPI_SPEC`` may name another copy,
e.g. the full schema.

``validate_response`` checks what the stand-in answers; ``validate_request`` checks what a client
sent (method, path, query, JSON body; e.g. entries of the stand-in's request log). The schema is
wrong in a few places, where it disagrees with PostHog's server code; each of those is patched
below, narrowly and with the server's actual behaviour stated beside it, and nothing else is
relaxed. Each patch first asserts the node still has the wrong shape, so a different spec copy
fails loudly instead of being silently loosened.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import yaml
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

SPEC_PATH = Path(
    os.environ.get(
        "POSTHOG_OPENAPI_SPEC",
        Path(__file__).resolve().parent / "data" / "posthog-openapi-subset.yaml",
    )
)
HOST = "https://us.posthog.com"
PREFIXES = ("/api/projects/{project_id}", "/api/environments/{project_id}")


class ContractError(AssertionError):
    """A request or response that the (patched) PostHog schema rejects."""


def _operation(spec: dict[str, Any], path: str, method: str) -> dict[str, Any] | None:
    return spec["paths"].get(path, {}).get(method)


def _patch(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]

    # `ExportedAsset.has_content` is typed `string`; the server returns a JSON boolean.
    node = schemas["ExportedAsset"]["properties"]["has_content"]
    assert node == {"readOnly": True, "type": "string"}, node
    schemas["ExportedAsset"]["properties"]["has_content"] = {"readOnly": True, "type": "boolean"}

    # `Insight.result`, `is_cached`, `query_status` and the other read-only result fields below
    # are typed as a bare `string`; the serializer emits arbitrary JSON, a boolean, an object,
    # a nullable timestamp, ... (each field's real type is given here).
    insight = schemas["Insight"]["properties"]
    real_types: dict[str, dict[str, Any]] = {
        "result": {},
        "hasMore": {},
        "columns": {},
        "types": {},
        "hogql": {"type": "string", "nullable": True},
        "alerts": {"type": "array"},
        "is_cached": {"type": "boolean"},
        "query_status": {
            "anyOf": [
                {"$ref": "#/components/schemas/QueryStatus"},
                {"enum": [None], "nullable": True},
            ]
        },
        "last_refresh": {"type": "string", "format": "date-time", "nullable": True},
        "cache_target_age": {"type": "string", "format": "date-time", "nullable": True},
        "next_allowed_client_refresh": {"type": "string", "format": "date-time", "nullable": True},
        "last_viewed_at": {"type": "string", "format": "date-time", "nullable": True},
    }
    for name, real in real_types.items():
        node = {k: v for k, v in insight[name].items() if k != "description"}
        assert node == {"readOnly": True, "type": "string"}, (name, insight[name])
        insight[name] = {"readOnly": True, **real}

    for prefix in PREFIXES:
        # `groups_list` marks `search` as required; the server treats it as optional.
        listing = _operation(spec, f"{prefix}/groups/", "get")
        if listing is not None:
            search = next(p for p in listing["parameters"] if p["name"] == "search")
            assert search["required"] is True
            search["required"] = False

        # `groups_property_values_retrieve` lists no query params; the server requires
        # `group_type_index` and `key`, and accepts `value`.
        values = _operation(spec, f"{prefix}/groups/property_values/", "get")
        if values is not None:
            assert [p["in"] for p in values["parameters"]] == ["path"], values["parameters"]
            values["parameters"] += [
                {"in": "query", "name": "group_type_index", "required": True,
                 "schema": {"type": "integer"}},
                {"in": "query", "name": "key", "required": True, "schema": {"type": "string"}},
                {"in": "query", "name": "value", "required": False, "schema": {"type": "string"}},
            ]  # fmt: skip

        # The `refresh` enum lists `async_except_on_cache_miss`, but the insights endpoints do not
        # accept that value (the server silently falls back to `force_cache`). Dropping it makes
        # a client that sends it fail the request check.
        for path in (f"{prefix}/insights/", f"{prefix}/insights/{{id}}/"):
            operation = _operation(spec, path, "get")
            if operation is None:
                continue
            refresh = next(p for p in operation["parameters"] if p["name"] == "refresh")
            refresh["schema"]["enum"].remove("async_except_on_cache_miss")

        # The insights list types `created_by` as an integer; PostHog parses it as a JSON array
        # of user ids (`created_by=[1,42]`, products/product_analytics/backend/api/insight.py).
        listing = _operation(spec, f"{prefix}/insights/", "get")
        if listing is not None:
            created_by = next(p for p in listing["parameters"] if p["name"] == "created_by")
            assert created_by["schema"] == {"type": "integer"}, created_by
            created_by["schema"] = {"type": "string", "pattern": r"^\[\s*(\d+\s*(,\s*\d+\s*)*)?\]$"}


def _jsonable(value: Any) -> Any:
    """YAML turns example timestamps into datetimes; the validators want JSON types only."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


@functools.cache
def load_spec() -> dict[str, Any]:
    """The patched spec as a dict (loaded once per process)."""
    with SPEC_PATH.open("rb") as handle:
        spec = _jsonable(yaml.load(handle, Loader=yaml.CSafeLoader))
    _patch(spec)
    return spec


@functools.cache
def openapi() -> OpenAPI:
    # The spec itself is not re-validated (slow, and not what these checks are about).
    return OpenAPI.from_dict(load_spec(), config=Config(spec_validator_cls=None))


def _errors(exc: Exception) -> str:
    parts = [str(exc)]
    cause = exc.__cause__
    while cause is not None:
        schema_errors = getattr(cause, "schema_errors", None)
        if schema_errors:
            parts += [f"  at {list(e.absolute_path)}: {e.message}" for e in schema_errors]
        else:
            parts.append(f"  caused by: {cause}")
        cause = cause.__cause__
    return "\n".join(parts)


def _template(path: str) -> str:
    """Paths in the schema end with a slash; PostHog accepts both forms."""
    path = path.split("?", 1)[0]
    return path if path.endswith("/") else f"{path}/"


def validate_request(
    method: str,
    path: str,
    query: dict[str, Any] | None = None,
    body: Any = None,
    *,
    authorization: bool = True,
) -> None:
    """Check one request as a client sent it; raises :class:`ContractError` if invalid."""
    request = MockRequest(
        HOST,
        method.lower(),
        _template(path),
        args=query or {},
        headers={"Authorization": "Bearer phx_contract"} if authorization else {},
        data=None if body is None else json.dumps(body).encode(),
    )
    try:
        openapi().validate_request(request)
    except Exception as exc:  # openapi-core raises a family of validation errors
        raise ContractError(f"{method} {path} request: {_errors(exc)}") from exc


def validate_response(method: str, path: str, status: int, body: Any) -> None:
    """Check one response body against the operation's documented response for ``status``."""
    request = MockRequest(HOST, method.lower(), _template(path))
    response = MockResponse(json.dumps(body).encode(), status_code=status)
    try:
        openapi().validate_response(request, response)
    except Exception as exc:
        raise ContractError(f"{method} {path} -> {status} response: {_errors(exc)}") from exc


_SPEC_URI = "urn:posthog-openapi"


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(load_spec(), default_specification=DRAFT4)
    return Registry().with_resource(_SPEC_URI, resource)


def validate_component(name: str, instance: Any) -> None:
    """Check a value against ``#/components/schemas/<name>`` (for undocumented statuses, e.g.
    the 202 of ``/query/:id/``, whose body is the documented 200 body)."""
    schema = {"$ref": f"{_SPEC_URI}#/components/schemas/{name}"}
    validator = OAS30Validator(schema, registry=_registry())
    problems = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [f"  at {list(e.absolute_path)}: {e.message}" for e in problems]
        raise ContractError(f"{name}:\n" + "\n".join(lines))
