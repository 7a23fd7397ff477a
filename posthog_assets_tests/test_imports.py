"""The one-way import rule: the HTTP client and the stand-in load without Dagster."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    [
        "posthog_assets.client",
        "posthog_assets.config",
        "posthog_assets.standin.server",
        "posthog_assets.standin.app",
    ],
)
def test_module_imports_without_dagster(module: str) -> None:
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m == 'dagster' or m.startswith('dagster'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} pulled in {out.stdout.strip()}"


def test_standin_imports_nothing_from_the_package_runtime() -> None:
    code = (
        "import sys, posthog_assets.standin.server, posthog_assets.standin.app\n"
        "bad = sorted(m for m in sys.modules if m.startswith('posthog_assets.')"
        " and not m.startswith('posthog_assets.standin'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
