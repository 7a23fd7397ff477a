"""``posthog.experiment_results``: each running or finished experiment's metrics, as PostHog's
experiment query computes them (``POST /query/`` with an ``ExperimentQuery``,
``posthog/hogql_queries/experiments/experiment_query_runner.py``), one row per metric and variant.

PostHog's answer holds the control variant as ``baseline`` and the others as ``variant_results``
(Bayesian: ``chance_to_win``, ``credible_interval``; frequentist: ``p_value``,
``confidence_interval``; either: ``significant``). The stats are null while a variant lacks data
(``validation_failures`` says why): such rows are stored as PostHog gives them. A metric whose
query fails is one row with ``error`` set, never dropped. Asked with ``refresh: blocking``
(PostHog's cached result if fresh), so a daily snapshot spends one query per metric at most.
"""

from collections.abc import Iterator, Mapping
from typing import Any

from posthog_assets.api.errors import PostHogError
from posthog_assets.api.hogql import run_query
from posthog_assets.snapshots.catalog import (
    CATALOG,
    CATALOG_GROUP,
    experiment_status,
    live_objects,
    read_list,
)
from posthog_assets.snapshots.source import SnapshotSource, StageRequest
from posthog_assets.tables import Table, columns

EXPERIMENT_RESULTS = Table(
    name="experiment_results",
    description="The results of each running or finished experiment's metrics, one row per "
    "metric and variant, as PostHog computes them; one snapshot a day.",
    group=CATALOG_GROUP,
    columns=columns("""
        experiment_id        BIGINT   The experiment (experiments.id).
        metric_kind          VARCHAR  primary or secondary.
        metric_index         INTEGER  Its position among the experiment's metrics of that kind.
        metric_uuid          VARCHAR  The metric's uuid.
        metric_name          VARCHAR  The metric's name.
        metric_type          VARCHAR  mean, funnel or ratio.
        variant_key          VARCHAR  The variant (control is the baseline); NULL when error.
        is_baseline          BOOLEAN  The control variant the others are compared with.
        method               VARCHAR  bayesian or frequentist (NULL for the baseline).
        number_of_samples    BIGINT   Exposed people (or sessions) in the variant.
        sum                  DOUBLE   The metric's sum over them.
        sum_squares          DOUBLE   The sum of its squares.
        mean                 DOUBLE   sum / number_of_samples.
        chance_to_win        DOUBLE   Bayesian: probability this variant beats control.
        credible_low         DOUBLE   Bayesian: credible interval, lower bound.
        credible_high        DOUBLE   Bayesian: credible interval, upper bound.
        p_value              DOUBLE   Frequentist: p-value against control.
        confidence_low       DOUBLE   Frequentist: confidence interval, lower bound.
        confidence_high      DOUBLE   Frequentist: confidence interval, upper bound.
        significant          BOOLEAN  PostHog calls the difference significant.
        validation_failures  JSON     Why PostHog computed no stats (e.g. not-enough-exposures).
        error                VARCHAR  The query's error, when PostHog could not compute it.
    """),
    key=("experiment_id", "metric_kind", "metric_index", "variant_key"),
    daily=True,
)


def result_rows(answer: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """The baseline and every variant of one ExperimentQuery answer."""
    baseline = answer.get("baseline")
    if isinstance(baseline, dict):
        yield {**_stats(baseline), "is_baseline": True, "method": None}
    for variant in answer.get("variant_results") or []:
        credible = variant.get("credible_interval") or [None, None]
        confidence = variant.get("confidence_interval") or [None, None]
        yield {
            **_stats(variant),
            "is_baseline": False,
            "method": variant.get("method"),
            "chance_to_win": variant.get("chance_to_win"),
            "credible_low": credible[0],
            "credible_high": credible[1],
            "p_value": variant.get("p_value"),
            "confidence_low": confidence[0],
            "confidence_high": confidence[1],
            "significant": variant.get("significant"),
        }


def _stats(variant: Mapping[str, Any]) -> dict[str, Any]:
    samples, total = variant.get("number_of_samples"), variant.get("sum")
    return {
        "variant_key": variant.get("key"),
        "number_of_samples": samples,
        "sum": total,
        "sum_squares": variant.get("sum_squares"),
        "mean": total / samples if samples and total is not None else None,
        "validation_failures": variant.get("validation_failures"),
    }


class ExperimentResultsSource(SnapshotSource):
    """Every metric of every running or finished experiment, one query each."""

    table = EXPERIMENT_RESULTS

    def stage(self, request: StageRequest) -> dict[str, Any]:
        client = request.client
        experiments, _ = live_objects(read_list(client, CATALOG["experiments"]), "experiments")
        poll = request.resource.poll_policy()
        rows = queries = failed = 0
        for experiment in experiments:
            if experiment_status(experiment) == "draft":
                continue
            for kind in ("primary", "secondary"):
                field = "metrics" if kind == "primary" else "metrics_secondary"
                for index, metric in enumerate(experiment.get(field) or []):
                    about = {
                        "experiment_id": experiment["id"],
                        "metric_kind": kind,
                        "metric_index": index,
                        "metric_uuid": metric.get("uuid"),
                        "metric_name": metric.get("name"),
                        "metric_type": metric.get("metric_type"),
                    }
                    node = {"kind": "ExperimentQuery", "experiment_id": experiment["id"],
                            "metric": metric}  # fmt: skip
                    queries += 1
                    try:
                        answer, _, _ = run_query(
                            client, node, poll=poll, refresh="blocking",
                            name=f"posthog-assets experiment {experiment['id']}",
                        )  # fmt: skip
                    except PostHogError as exc:
                        if exc.retryable:
                            raise
                        failed += 1
                        rows += request.staging.write([{**about, "error": str(exc)}])
                        continue
                    rows += request.staging.write({**about, **r} for r in result_rows(answer))
        return {"rows": rows, "experiment_queries": queries, "failed_queries": failed}
