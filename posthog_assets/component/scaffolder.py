"""``dg scaffold defs posthog_assets.PostHogProjectComponent <name>``: a ready ``defs.yaml``."""

from __future__ import annotations

from dagster.components import Scaffolder, ScaffoldRequest, scaffold_component
from pydantic import BaseModel, ConfigDict, field_validator

from posthog_assets.config import matching, parse_project_id, validate_host


class PostHogScaffoldParams(BaseModel):
    """Options of ``dg scaffold defs``; whatever is left out gets a placeholder to edit. Checked
    as the component checks them, so a scaffold never writes a ``defs.yaml`` that cannot load."""

    model_config = ConfigDict(extra="forbid")

    host: str = "https://us.posthog.com"
    project_id: str = "{{ env.POSTHOG_PROJECT_ID }}"
    name: str = "default"

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return value if _is_template(value) else validate_host(value)

    @field_validator("project_id", mode="before")
    @classmethod
    def _project_id(cls, value: object) -> str:
        text = str(value)
        return text if _is_template(text) else str(parse_project_id(text))

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return matching(value, r"^[a-z][a-z0-9_]*$", "lower_snake_case")


def _is_template(value: str) -> bool:
    return value.strip().startswith("{{")


class PostHogProjectScaffolder(Scaffolder[PostHogScaffoldParams]):
    @classmethod
    def get_scaffold_params(cls) -> type[PostHogScaffoldParams]:
        return PostHogScaffoldParams

    def scaffold(self, request: ScaffoldRequest[PostHogScaffoldParams]) -> None:
        params = request.params or PostHogScaffoldParams()
        scaffold_component(
            request,
            {
                "project": {
                    "name": params.name,
                    "host": params.host,
                    "project_id": params.project_id,
                    "personal_api_key": "{{ env.POSTHOG_PERSONAL_API_KEY }}",
                    "api_prefix": "projects",
                },
                "exports": [
                    {"dashboards": "all", "format": "image/png"},
                    {"insights": {"tag": "weekly"}, "format": "text/csv"},
                ],
                "insights": {"refresh": "async", "schedule": "0 6 * * *"},
                "groups": {"property_values": True, "tracked": []},
                "translation": {"group_name": "posthog"},
            },
        )
