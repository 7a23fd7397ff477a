"""The ``dg`` component: a PostHog project in ``defs.yaml``, built from stored project state."""
