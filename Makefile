# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make demo   install, start the local PostHog stand-in (unless POSTHOG_HOST is set), run the main job
#   make test   install, run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
STAMP := $(VENV)/.installed
export UV_PYTHON_DOWNLOADS := never
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install demo test lint ui bench check-defs clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv

$(STAMP): requirements.txt pyproject.toml | $(UV)
	test -x $(VENV)/bin/python || $(UV) venv -q -p $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q -r requirements.txt -e .
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/python -m posthog_assets.demo

test: install
	$(VENV)/bin/ruff check posthog_assets posthog_assets_tests bench
	$(VENV)/bin/python -m pytest -q posthog_assets_tests
	$(VENV)/bin/dg check defs

lint: install
	$(VENV)/bin/ruff check posthog_assets posthog_assets_tests bench

check-defs: install
	$(VENV)/bin/dg check defs

clean:
	rm -rf data .dagster_home .tmp_dagster_home_* .pytest_cache
