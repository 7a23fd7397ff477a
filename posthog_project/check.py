"""``dg check defs`` for this repository (what ``make test`` runs after the tests, and
``make check-defs``).

The shipped component resolves its export selections from stored state, so the check first
refreshes it: from the PostHog the env points at, or from the local stand-in when
``POSTHOG_HOST`` is unset (started here and stopped after).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

from posthog_project.demo import (
    dg_command,
    refresh_defs_state,
    use_standin_without_credentials,
)


def main() -> int:
    root = Path.cwd()
    with ExitStack() as stack:
        use_standin_without_credentials(stack)
        refresh_defs_state(root)
        command, env = dg_command("check", "defs")
        return subprocess.run(command, cwd=root, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
