"""The build flow: sources -> shards -> generate -> score -> select -> publish.

    from pipelines.build import build_triplets
    summary = build_triplets("configs/demo.yaml")

Each shard's generation and scoring is a Prefect task whose result is cached on content (the
shard's rows, the stage's config, the weights' fingerprints) and stored under the config's
`work_dir`, so a rerun after a failure resumes from the shards that finished, and a rerun of an
unchanged build loads no model at all. Below the task cache, the generation and score caches
(also under `work_dir`) make a grown source file cost only its new rows.

On success the flow publishes one version, creates artifacts (counts per language pair, drops
by reason, how often each system was chosen and rejected, score and margin summaries, agreement
with human labels) and emits `cpo_data.triplets.published` with the dataset's URI, name and
version in its payload. A failure in any shard fails the run before anything is published.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext, get_run_context
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner

from cpo_data import build
from cpo_data.config import BuildConfig, ConfigError, load_config
from cpo_data.generate import GenerateError
from cpo_data.score import ScoreError

PUBLISHED_EVENT = "cpo_data.triplets.published"

# Errors that a retry cannot fix: a wrong config or wrong data fails at once.
_PERMANENT = (ConfigError, GenerateError, ScoreError, ValueError, TypeError, KeyError)


def _retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    try:
        state.result()
    except _PERMANENT:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, CUDA, network) may pass on retry
        return True
    return False


def _cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    return parameters["key"]


def _flow_run_id() -> str:
    return str(get_run_context().task_run.flow_run_id)


@task(name="generate-shard", cache_key_fn=_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def generate_shard(shard, config: BuildConfig, key: str, label: str) -> dict:
    """Candidates for one shard; `key` is its content key (the cache key)."""
    result = build.generate_shard(shard, config)
    get_run_logger().info("%s: %d sources -> %d candidates (generated %s, from cache %s)",
                          label, shard.num_rows, result.table.num_rows,
                          result.report.generated or "-", result.report.from_cache or "-")
    return {"result": result, "flow_run": _flow_run_id()}


@task(name="score-shard", cache_key_fn=_cache_key, persist_result=True, retries=2,
      retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def score_shard(generated: dict, shard, config: BuildConfig, key: str, label: str) -> dict:
    """Scores of one shard's candidates; `key` is its content key (the cache key)."""
    candidates = generated["result"].table
    result = build.score_shard(candidates, shard, config)
    get_run_logger().info("%s: %d candidates -> %d scores (scored %s, from cache %s)", label,
                          candidates.num_rows, result.table.num_rows,
                          result.report.scored or "-", result.report.from_cache or "-")
    return {"result": result, "flow_run": _flow_run_id()}


@task(name="select-and-publish")
def select_and_publish(run: build.BuildRun) -> build.BuildSummary:
    return build.select_and_publish(run)


def artifact_key(name: str, what: str) -> str:
    # Artifact keys take lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower())


def create_artifacts(summary: build.BuildSummary, name: str) -> None:
    """The build's tables in the Prefect UI, under keys that stay the same across runs."""
    description = f"{summary.dataset_uri} version {summary.version}"
    create_table_artifact(
        key=artifact_key(name, "lang-pairs"), description=f"Triplets per language pair, "
        f"{description}", table=[{"lang_pair": k, "triplets": v}
                                 for k, v in sorted(summary.lang_pairs.items())])
    create_table_artifact(
        key=artifact_key(name, "drops"), description=f"Dropped rows by reason, {description}",
        table=[{"reason": k, "rows": v} for k, v in sorted(summary.dropped.items())] or
        [{"reason": "none", "rows": 0}])
    create_table_artifact(
        key=artifact_key(name, "systems"), description="How often each system was chosen "
        f"and rejected (ALMA-R's Table 2), {description}",
        table=summary.systems or [{"system": "none", "chosen": 0, "rejected": 0}])
    lines = [f"# {summary.dataset_uri} {summary.version}", "",
             f"{summary.triplets} triplets from {summary.sources} sources "
             f"({summary.candidates} candidates, {summary.shards} shards, "
             f"{summary.shards_reused} reused).", ""]
    if summary.score_summary:
        lines += ["| score | count | mean | min | max |", "|---|---|---|---|---|"]
        for scorer, stats in summary.score_summary.items():
            if stats["count"]:
                lines.append(f"| {scorer} | {stats['count']} | {stats['mean']:.4f} | "
                             f"{stats['min']:.4f} | {stats['max']:.4f} |")
    if summary.agreement:
        agreement = summary.agreement
        share = agreement["agree"] / agreement["compared"] if agreement["compared"] else 0.0
        lines += ["", f"Human labels: {agreement['labelled']} labelled sources; the ranking "
                  f"score agrees on {agreement['agree']} of {agreement['compared']} compared "
                  f"({share:.0%}), ties {agreement['ties']}."]
    create_markdown_artifact(key=artifact_key(name, "summary"), markdown="\n".join(lines),
                             description=description)


def emit_published(summary: build.BuildSummary, config: BuildConfig):
    """The event a training deployment waits for; its payload names the version."""
    return emit_event(
        event=PUBLISHED_EVENT,
        # The URI label lets a trigger tell apart two stores holding datasets of one name.
        resource={"prefect.resource.id": f"cpo-data.dataset.{config.publish.name}",
                  "prefect.resource.name": config.publish.name,
                  "cpo-data.dataset-uri": summary.dataset_uri},
        payload={"dataset_uri": summary.dataset_uri, "store_uri": config.publish.uri,
                 "name": config.publish.name, "version": summary.version,
                 "triplets": summary.triplets},
    )


@flow(name="cpo-data-build", task_runner=ThreadPoolTaskRunner(max_workers=1),
      validate_parameters=False)
def build_triplets(config: str | BuildConfig, retries: int | None = None) -> dict:
    """Build and publish one version of the triplet dataset from a YAML config (or a loaded
    `BuildConfig`). Returns the build summary as a dict."""
    logger = get_run_logger()
    if not isinstance(config, BuildConfig):
        config = load_config(config)
    run = build.start_build(config)
    config = run.config
    logger.info("%d sources (%s) in %d shard(s) of up to %d", run.summary.sources,
                ", ".join(run.loaded.report.files), len(run.shards), config.shard_size)
    # Finished shards are stored under work_dir, next to the caches they came from (a Path is
    # the one result storage Prefect takes without a saved block).
    options: dict[str, Any] = {
        "result_storage": Path(config.work_dir).expanduser() / "task-results"}
    if retries is not None:
        options["retries"] = retries
    generate_task = generate_shard.with_options(**options)
    score_task = score_shard.with_options(**options)

    futures = []
    for number, shard in enumerate(run.shards, 1):
        label = f"shard {number}/{len(run.shards)}"
        generate_key, score_key = build.shard_keys(run, shard)
        generated = generate_task.submit(shard, config, generate_key, label)
        futures.append((generated, score_task.submit(generated, shard, config, score_key,
                                                     label)))
    # Any shard failing raises here, before anything is published. A result made by an earlier
    # run came from Prefect's task cache: its work is not counted again.
    run_id = str(get_run_context().flow_run.id)
    for generated_future, scored_future in futures:
        generated, scored = generated_future.result(), scored_future.result()
        build.add_shard(run, generated["result"], scored["result"],
                        generated_now=generated["flow_run"] == run_id,
                        scored_now=scored["flow_run"] == run_id)
    summary = run.summary
    logger.info("generated %s, scored %s; %d of %d shards reused from an earlier run",
                summary.generated or "nothing", summary.scored or "nothing",
                summary.shards_reused, len(run.shards))
    summary = select_and_publish(run)
    logger.info("published %s version %s: %d triplets", summary.dataset_uri, summary.version,
                summary.triplets)
    create_artifacts(summary, config.publish.name)
    emit_published(summary, config)
    return dataclasses.asdict(summary)
