"""Helpers the tests share: the session stand-in's sizes and HTTP helpers, the one resource
builder, snapshot and export helpers, the reliability "world", the shared `dg dev`, and the
OpenAPI contract check. Tests import from here, never from ``conftest.py``."""
