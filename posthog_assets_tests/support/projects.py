"""A user's ``dg`` project in a temporary folder: what someone who installs the package builds;
and a PostHog project built in Python, for tests that call the factories directly.

The ``dg`` project has its own root module (a unique name, so several load in one test process),
a ``defs`` folder for component instances, and runs ``dg`` with this interpreter's environment
(the package is installed there, its component registered through the entry point).
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import yaml

from posthog_assets.config import (
    DEFAULT_PROJECT_NAME,
    ExportConfig,
    GroupsConfig,
    InsightsConfig,
    PostHogProject,
)
from posthog_assets.resources import PostHogResource
from posthog_assets_tests.support.config_file import COMPONENT
from posthog_assets_tests.support.session import standin_env
from posthog_standin.server import StandinProcess

DG_TIMEOUT_S = 180.0


@dataclass
class UserProject:
    root: Path
    module: str
    env: dict[str, str]

    @classmethod
    def create(cls, folder: Path, standin: StandinProcess) -> UserProject:
        module = f"acme_{uuid.uuid4().hex[:8]}"
        package = folder / "src" / module
        (package / "defs").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "defs" / "__init__.py").write_text("")
        (package / "definitions.py").write_text(
            "from pathlib import Path\n\nimport dagster as dg\n\n"
            "defs = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)\n"
        )
        (folder / "pyproject.toml").write_text(
            f'[project]\nname = "{module}"\nversion = "0.1.0"\n\n'
            '[tool.dg]\ndirectory_type = "project"\n\n'
            f'[tool.dg.project]\nroot_module = "{module}"\n'
        )
        venv_bin = Path(sys.executable).parent
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("POSTHOG_ASSETS_CONFIG")},
            **standin_env(standin, folder / "data"),
            "POSTHOG_PERSONAL_API_KEY": standin.key,
            "VIRTUAL_ENV": str(venv_bin.parent),
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONPATH": str(folder / "src"),
        }
        src = str(folder / "src")
        if src not in sys.path:
            sys.path.insert(0, src)
        return cls(root=folder, module=module, env=env)

    @property
    def defs_dir(self) -> Path:
        return self.root / "src" / self.module / "defs"

    def dg(self, *args: str, check: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        """Run ``dg`` in the project, as its user would in a terminal."""
        venv_dg = Path(sys.executable).parent / "dg"
        done = subprocess.run(
            [str(venv_dg), *args],
            cwd=self.root,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=DG_TIMEOUT_S,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"dg {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
        return done

    def defs_yaml(self, name: str) -> Path:
        return self.defs_dir / name / "defs.yaml"

    def read_attributes(self, name: str) -> dict[str, Any]:
        return yaml.safe_load(self.defs_yaml(name).read_text())["attributes"]

    def write_component(self, name: str, attributes: Mapping[str, Any]) -> Path:
        path = self.defs_yaml(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"type": COMPONENT, "attributes": dict(attributes)}))
        return path

    def state_files(self) -> list[Path]:
        folder = self.defs_dir / ".local_defs_state"
        return sorted(p for p in folder.rglob("state")) if folder.exists() else []

    def load(self) -> dg.Definitions:
        """The project's definitions, loaded in this process (with ``os.environ`` as it is)."""
        return dg.load_from_defs_folder(path_within_project=self.defs_dir)


def python_project(
    *exports: ExportConfig | Mapping[str, Any],
    name: str = DEFAULT_PROJECT_NAME,
    resource: PostHogResource | None = None,
    insights: Mapping[str, Any] | None = None,
    groups: Mapping[str, Any] | None = None,
    duckdb_path: str | Path = "posthog.duckdb",
) -> PostHogProject:
    """A project as Python code builds it, holding ``exports`` (``{"name": "weekly_png",
    "insight": 1, "format": "image/png"}``). A run uses the resource it is given under the
    project's key (``posthog`` for ``default``); ``resource`` is what the definitions would hold
    (by default a placeholder whose host, project id and key come from the environment)."""
    return PostHogProject(
        resource=resource
        or PostHogResource(
            host=dg.EnvVar("POSTHOG_HOST"),
            project_id=dg.EnvVar("POSTHOG_PROJECT_ID"),
            personal_api_key=dg.EnvVar("POSTHOG_PERSONAL_API_KEY"),
        ),
        name=name,
        exports=tuple(ExportConfig.model_validate(e) for e in exports),
        insights=InsightsConfig.model_validate(insights or {}),
        groups=GroupsConfig.model_validate(groups or {}),
        duckdb_path=str(duckdb_path),
    )
