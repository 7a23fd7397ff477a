"""``dg scaffold defs posthog_assets.PostHogProjectComponent <folder>``: a ``defs.yaml`` that loads
as written against any project, with the other selections as commented examples."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dagster.components import Scaffolder, ScaffoldRequest, scaffold_component
from pydantic import BaseModel, ConfigDict, field_validator

from posthog_assets.config import DEFAULT_PROJECT_NAME, matching, parse_project_id, validate_host

COMPONENT_TYPE = "posthog_assets.PostHogProjectComponent"


class PostHogScaffoldParams(BaseModel):
    """Options of ``dg scaffold defs`` (``--json-params``). Checked as the component checks
    them, so a scaffold never writes a ``defs.yaml`` that cannot load."""

    model_config = ConfigDict(extra="forbid")

    host: str = "{{ env.POSTHOG_HOST }}"
    project_id: str = "{{ env.POSTHOG_PROJECT_ID }}"
    name: str | None = None

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
    def _name(cls, value: str | None) -> str | None:
        return None if value is None else matching(value, r"^[a-z][a-z0-9_]*$", "lower_snake_case")


def _is_template(value: str) -> bool:
    return value.strip().startswith("{{")


_TEMPLATE = """\
type: {type}

attributes:
  project:                             # the project's PostHogResource: any of its fields
    name: {name}                       # {name_note}
    host: {host}
    project_id: {project_id}
    personal_api_key: "{{{{ env.POSTHOG_PERSONAL_API_KEY }}}}"   # read when a run starts
  exports:
    - dashboards: all                  # every dashboard, as PNG
    # Other selections (each entry builds one export asset per object it selects):
    # - insight: 42                    # by numeric id: needs no stored state
    #   format: text/csv               # text/csv, image/png or the XLSX MIME type
    #   name: signups_csv
    # - insights: {{tag: weekly}}        # by tag; also dashboard, search, short_ids, favorited
    #   format: text/csv
    # - dashboard: Growth              # one dashboard, by id or exact name
  insights:                            # the insights snapshot, into DuckDB
    refresh: async
    schedule: "0 6 * * *"
  # groups: {{property_values: true, tracked: []}}
  # events: {{start_date: "2026-01-01", properties: [$browser]}}   # one partition per UTC day
  # persons: {{}}                        # persons and their distinct ids
  # duckdb_path: data/posthog.duckdb
  # translation: {{group_name: posthog}}
"""


def default_name(target: Path, project_root: Path | None) -> str:
    """``default`` for the code location's first PostHog project (unprefixed keys), else the
    folder's name: a second project never shares the first one's keys or stored state."""
    root = next((p for p in target.parents if p.name == "defs"), project_root or target.parent)
    for other in root.rglob("defs.yaml"):
        if other.parent != target and COMPONENT_TYPE in other.read_text(errors="replace"):
            name = re.sub(r"[^a-z0-9_]+", "_", target.name.lower()).strip("_")
            return name if re.match(r"^[a-z]", name) else f"project_{name}"
    return DEFAULT_PROJECT_NAME


class PostHogProjectScaffolder(Scaffolder[PostHogScaffoldParams]):
    @classmethod
    def get_scaffold_params(cls) -> type[PostHogScaffoldParams]:
        return PostHogScaffoldParams

    def scaffold(self, request: ScaffoldRequest[PostHogScaffoldParams]) -> None:
        params = request.params or PostHogScaffoldParams()
        if request.scaffold_format != "yaml":
            scaffold_component(request)
            return
        name = params.name or default_name(request.target_path, request.project_root)
        text = _TEMPLATE.format(
            type=request.type_name,
            name=name,
            name_note=(
                "keys posthog/..., resource 'posthog'"
                if name == DEFAULT_PROJECT_NAME
                else f"keys posthog/{name}/..., resource 'posthog_{name}'"
            ),
            host=json.dumps(params.host),
            project_id=json.dumps(params.project_id),
        )
        if request.append:
            with open(request.target_path, "a", encoding="utf-8") as f:
                f.write("---\n" + text)
        else:
            (request.target_path / "defs.yaml").write_text(text, encoding="utf-8")
