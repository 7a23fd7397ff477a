"""This repository's own component instances (the demo project); see posthog/defs.yaml."""
