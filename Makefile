# Two commands do all set-up on a fresh machine with Python 3.11 and pip:
#   make demo   install, start the local PostHog stand-in (unless POSTHOG_HOST is set), run the main job and the last 3 days of events
#   make test   install, run the whole test suite
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
TOOLS := .tools
UV := $(TOOLS)/bin/uv
STAMP := $(VENV)/.installed
export UV_PYTHON_DOWNLOADS := never
export DAGSTER_HOME ?= $(CURDIR)/.dagster_home

.PHONY: install demo test test-quick lint ui bench check-defs clean system-deps

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install -q uv

$(STAMP): requirements.txt pyproject.toml | $(UV)
	test -x $(VENV)/bin/python || $(UV) venv -q -p $(PYTHON) $(VENV)
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q -r requirements.txt -e .
	# this repository's own code location (posthog_project) is not part of the package: make
	# it importable in the development environment only, for dg and the processes it starts
	$(VENV)/bin/python -c "import site; open(site.getsitepackages()[0] + '/posthog_repository.pth', 'w').write('$(CURDIR)\n')"
	touch $(STAMP)

install: $(STAMP) $(DAGSTER_HOME)/dagster.yaml

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	cp dagster.yaml $@

demo: install
	$(VENV)/bin/python -m posthog_project.demo

# Two workers: most of the suite waits on the stand-in, PostHog-style renders and Dagster runs.
# The UI and daemon tests share one `dg dev` and stay on one worker (xdist group).
PYTEST := $(VENV)/bin/python -m pytest -q -n 2 --dist loadgroup

test: install system-deps
	$(VENV)/bin/ruff check posthog_assets posthog_standin posthog_project posthog_assets_tests bench
	$(PYTEST) posthog_assets_tests
	$(VENV)/bin/python -m posthog_project.check

# The first two tiers only (unit, integration against the stand-in), in about 3 minutes: they mostly
# wait on HTTP, so a third worker overlaps those waits even on two cores.
test-quick: install
	$(PYTEST) -n 3 -m "not system" posthog_assets_tests

# The Dagster UI with the daemon (schedules, sensors, queued runs) on http://127.0.0.1:3000, against
# the local stand-in unless POSTHOG_HOST is set. Ctrl-C stops everything it started.
ui: install
	$(VENV)/bin/python -m posthog_project.ui

# Debian's chromium (browser test; Playwright's driver also needs libatomic1), postgresql
# (deploy/ Postgres test) and redis-server (Celery broker, shared rate-limit gate), installed only
# when missing. Without root or sudo they are left out, and those tests skip saying why.
system-deps:
	@missing=""; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	dpkg -s postgresql >/dev/null 2>&1 || missing="$$missing postgresql"; \
	dpkg -s libatomic1 >/dev/null 2>&1 || missing="$$missing libatomic1"; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "system-deps: no apt-get here; install$$missing yourself, or those tests skip"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; else \
	  echo "system-deps: not root and no sudo; cannot install$$missing, so those tests skip"; \
	  exit 0; fi; \
	echo "system-deps: installing$$missing from Debian packages"; \
	$$sudo apt-get update -q && \
	$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q$$missing

# Benchmarks (figures, not pass/fail): exports, snapshots (incl. plain script and dlt), tidy
# tables, Celery (1 worker vs 2; PostgreSQL and Redis from system-deps), chaos.
bench: install system-deps
	VIRTUAL_ENV=$(VENV) $(UV) pip install -q -r bench/requirements.txt -e .
	$(VENV)/bin/python bench/exports.py
	$(VENV)/bin/python bench/snapshots.py
	$(VENV)/bin/python bench/tidy.py
	$(VENV)/bin/python bench/events.py
	$(VENV)/bin/python bench/celery.py
	$(VENV)/bin/python bench/chaos.py

lint: install
	$(VENV)/bin/ruff check posthog_assets posthog_standin posthog_project posthog_assets_tests bench

check-defs: install
	$(VENV)/bin/python -m posthog_project.check

clean:
	rm -rf data .dagster_home .tmp_dagster_home_* .pytest_cache
