"""Contract checks of the catalog routes (annotations, cohorts, feature flags, actions,
experiments) and of ``ExperimentQuery`` answers against PostHog's published OpenAPI schema.

The schema is ``data/posthog-openapi-catalog-subset.yaml`` (``make_openapi_catalog_subset.py``
cuts it from the same full copy as ``openapi.py``'s subset). As there, the few nodes where the
schema disagrees with PostHog's server code are patched below, narrowly, with the server's
behaviour stated beside each; each patch first asserts the node still has the wrong shape.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import yaml
from openapi_core import Config, OpenAPI
from openapi_core.testing import MockRequest, MockResponse
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4

from posthog_assets_tests.support.openapi import ContractError, _errors, _jsonable

SPEC_PATH = Path(__file__).resolve().parent / "data" / "posthog-openapi-catalog-subset.yaml"
HOST = "https://us.posthog.com"
_URI = "urn:posthog-openapi-catalog"


def _or_null(ref: str) -> dict[str, Any]:
    return {"anyOf": [{"$ref": ref}, {"enum": [None], "nullable": True}], "readOnly": True}


def _patch(spec: dict[str, Any]) -> None:
    schemas = spec["components"]["schemas"]
    user = {"allOf": [{"$ref": "#/components/schemas/UserBasic"}], "readOnly": True}

    # Annotation.created_by: a nested UserBasicSerializer on a nullable foreign key; DRF renders
    # null for an annotation without a creator (e.g. created from a GitHub deploy).
    node = schemas["Annotation"]["properties"]["created_by"]
    assert node == user, node
    schemas["Annotation"]["properties"]["created_by"] = _or_null("#/components/schemas/UserBasic")

    flag = schemas["FeatureFlag"]["properties"]
    # experiment_set is a SerializerMethodField returning the ids of the flag's experiments.
    assert flag["experiment_set"] == {"readOnly": True, "type": "string"}, flag["experiment_set"]
    flag["experiment_set"] = {"readOnly": True, "type": "array", "items": {"type": "integer"}}
    # surveys/features: SerializerMethodFields returning `Serializer(many=True).data`, lists.
    for name in ("surveys", "features"):
        assert flag[name] == {"additionalProperties": {}, "readOnly": True, "type": "object"}
        flag[name] = {"readOnly": True, "type": "array", "items": {"type": "object"}}
    # usage_dashboard: a PrimaryKeyRelatedField on a nullable foreign key (SET_NULL).
    assert flag["usage_dashboard"] == {"readOnly": True, "type": "integer"}
    flag["usage_dashboard"] = {"readOnly": True, "type": "integer", "nullable": True}
    # evaluation_tags is write_only on input, but EvaluationTagSerializerMixin.to_representation
    # adds the flag's evaluation tag names to every response.
    assert flag["evaluation_tags"] == {"items": {}, "type": "array", "writeOnly": True}
    flag["evaluation_tags"] = {"items": {"type": "string"}, "type": "array", "readOnly": True}

    # Action.creation_context: `get_creation_context` returns None, always.
    action = schemas["Action"]["properties"]
    assert action["creation_context"] == {"readOnly": True, "type": "string"}
    action["creation_context"] = {"readOnly": True, "type": "string", "nullable": True}

    # Experiment.holdout: ExperimentHoldoutSerializer(read_only=True) on a nullable foreign key.
    experiment = schemas["Experiment"]["properties"]
    holdout = {"allOf": [{"$ref": "#/components/schemas/ExperimentHoldout"}], "readOnly": True}
    assert experiment["holdout"] == holdout, experiment["holdout"]
    experiment["holdout"] = _or_null("#/components/schemas/ExperimentHoldout")

    # ExperimentQueryResponse: `Optional[...]` fields of the pydantic model whose schema is a
    # $ref (significance_code) or an anyOf (variants) lost their null in the conversion; the
    # endpoint dumps the model with its None fields (every legacy field of a new-style answer).
    response = schemas["ExperimentQueryResponse"]["properties"]
    code = {"$ref": "#/components/schemas/ExperimentSignificanceCode"}
    assert response["significance_code"] == code, response["significance_code"]
    response["significance_code"] = {"anyOf": [code, {"enum": [None], "nullable": True}]}
    variants = {"$ref": "#/components/schemas/Variants_1"}
    assert response["variants"] == variants, response["variants"]
    response["variants"] = {"anyOf": [variants, {"enum": [None], "nullable": True}]}

    # ActionViewSet.list is overridden (":HACKY:"): `{"results": [...]}`, no count, no pages.
    listing = spec["paths"]["/api/projects/{project_id}/actions/"]["get"]["responses"]["200"]
    for content in listing["content"].values():
        assert content["schema"] == {"$ref": "#/components/schemas/PaginatedActionList"}
        content["schema"] = {
            "type": "object",
            "required": ["results"],
            "additionalProperties": False,
            "properties": {
                "results": {"type": "array", "items": {"$ref": "#/components/schemas/Action"}}
            },
        }


@functools.cache
def load_spec() -> dict[str, Any]:
    with SPEC_PATH.open("rb") as handle:
        spec = _jsonable(yaml.load(handle, Loader=yaml.CSafeLoader))
    _patch(spec)
    return spec


@functools.cache
def _openapi() -> OpenAPI:
    return OpenAPI.from_dict(load_spec(), config=Config(spec_validator_cls=None))


def validate_response(path: str, status: int, body: Any) -> None:
    """A ``GET`` of a catalog path (``/api/projects/1/cohorts/``) against its documented body."""
    template = path.split("?", 1)[0].rstrip("/") + "/"
    request = MockRequest(HOST, "get", template)
    response = MockResponse(json.dumps(body).encode(), status_code=status)
    try:
        _openapi().validate_response(request, response)
    except Exception as exc:
        raise ContractError(f"GET {path} -> {status} response: {_errors(exc)}") from exc


@functools.cache
def _registry() -> Registry:
    resource = Resource.from_contents(load_spec(), default_specification=DRAFT4)
    return Registry().with_resource(_URI, resource)


def validate_component(name: str, instance: Any) -> None:
    """``instance`` against ``#/components/schemas/<name>`` of the catalog subset."""
    validator = OAS30Validator({"$ref": f"{_URI}#/components/schemas/{name}"}, registry=_registry())
    problems = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [f"  at {list(e.absolute_path)}: {e.message}" for e in problems]
        raise ContractError(f"{name}:\n" + "\n".join(lines))
