"""``dg scaffold defs posthog_assets.PostHogProjectComponent <name>``: a ready ``defs.yaml``."""

from __future__ import annotations

from dagster.components import Scaffolder, ScaffoldRequest, scaffold_component
from pydantic import BaseModel


class PostHogScaffoldParams(BaseModel):
    """Options of ``dg scaffold defs``; whatever is left out gets a placeholder to edit."""

    host: str = "https://us.posthog.com"
    project_id: str = "{{ env.POSTHOG_PROJECT_ID }}"
    name: str = "default"


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
