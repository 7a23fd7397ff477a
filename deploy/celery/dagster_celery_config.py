"""Celery settings of the step workers, read by ``celery -A dagster_celery.app worker``.

``dagster_celery.app`` imports a module of exactly this name when it can: put this folder on the
workers' ``PYTHONPATH``. The broker and the result backend come from the environment, so this
file holds no secret. Why each setting: deploy/celery/README.md.
"""

import os

broker_url = os.environ["DAGSTER_CELERY_BROKER_URL"]
result_backend = os.environ["DAGSTER_CELERY_BACKEND_URL"]

# A worker takes a step only when a pool process is free to start it (Redis brokers only): a
# worker that dies holds nothing but the steps it was running, none waiting in its hands.
worker_prefetch_multiplier = 1
worker_disable_prefetch = True
# The result records the worker that started the step; the run worker pings it and fails the
# step when it stays silent (posthog_project/executor.py, `lost_worker_timeout`).
task_track_started = True
# Acknowledge on start (Celery's default), not on completion: with acks_late the message of a
# step whose worker died would come back after the broker's visibility timeout (1 h) and run the
# step again on another worker, long after the run had failed or been re-executed.
task_acks_late = False
