"""The build flow: sources -> shards -> generate -> score -> select -> publish.

    from pipelines.build import build_triplets
    summary = build_triplets("configs/demo.yaml")

Each shard's generation and scoring is a Prefect task whose output is kept on content (the
shard's rows, the stage's config, the weights' fingerprints) as Parquet under the config's
`work_dir/shards` (`cpo_data.staging`), so a rerun after a failure resumes from the shards that
finished, and a rerun of an unchanged build loads no model at all. Below that, the generation
and score caches (also under `work_dir`) make a grown source file cost only its new rows. The
build holds the dataset's lock (one writer per dataset) from its first step to its publish,
and a build whose triplets equal the newest version's publishes nothing ("unchanged").

The shards run one at a time in the flow's process, or, with `runner: {kind: dask}` in the
config, on a Dask cluster through prefect-dask (`pipelines/dask_runner.py`): a local one started
for the build, one worker per GPU, or a running one at `runner.address`. Either way each
process keeps its models loaded from one shard to the next. Every shard is generated before
any is scored, and a process releases its generators when its first scorer loads on their
device, so a GPU holds one stage's models at a time.

On success the flow publishes one version (or finds it unchanged), creates artifacts (counts
per language pair, drops by reason, how often each system was chosen and rejected, score and
margin summaries, agreement with human labels) and emits `cpo_data.triplets.published` with
the dataset's URI, name and version in its payload (not when unchanged). A failure in any
shard fails the run before anything is published.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event
from prefect.task_runners import ThreadPoolTaskRunner

from cpo_data import build, locks
from cpo_data.config import BuildConfig, RunnerConfig
from cpo_data.errors import UserError
from cpo_data.generate import GenerateReport
from cpo_data.score import ScoreReport

PUBLISHED_EVENT = "cpo_data.triplets.published"

# Errors that a retry cannot fix fail at once: whatever the user must fix (wrong config, data,
# model, device), and programming errors.
_PERMANENT = (UserError, ValueError, TypeError, KeyError)


def _retry_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's hook signature
    try:
        state.result()
    except _PERMANENT:
        return False
    except Exception:  # noqa: BLE001 - anything else (I/O, CUDA, network) may pass on retry
        return True
    return False


# Finished shards are kept by the stages themselves, as Parquet under work_dir/shards
# (`cpo_data.staging`), not as Prefect's persisted results (cloudpickles, which run code when
# read): the tasks cache nothing and return only a key, so the flow holds no shard's tables.
@task(name="generate-shard", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def generate_shard(shard: build.Shard, config: BuildConfig, label: str) -> dict:
    """Candidates for one shard (its sources read from work_dir), kept under its key."""
    key = shard.generate_key
    result, reused = build.staged_generate(build.shard_table(config, shard), config, key)
    get_run_logger().info("%s: %d sources -> %d candidates (%s)", label, shard.rows,
                          result.table.num_rows, "finished by an earlier run" if reused else
                          f"generated {result.report.generated or '-'}, from cache "
                          f"{result.report.from_cache or '-'}")
    return {"key": key, "reused": reused, "process": build.process_name(),
            "report": dataclasses.asdict(result.report)}


@task(name="score-shard", cache_policy=NO_CACHE, persist_result=False, retries=2,
      retry_delay_seconds=10, retry_condition_fn=_retry_transient)
def score_shard(generated: dict, shard: build.Shard, config: BuildConfig, label: str) -> dict:
    """Scores of one shard's staged candidates, kept under its key."""
    key = shard.score_key
    result, reused = build.staged_score(build.shard_table(config, shard), config, key,
                                        generated["key"])
    get_run_logger().info("%s: %d scores (%s)", label, result.table.num_rows,
                          "finished by an earlier run" if reused else
                          f"scored {result.report.scored or '-'}, from cache "
                          f"{result.report.from_cache or '-'}")
    return {"key": key, "reused": reused, "process": build.process_name(),
            "report": dataclasses.asdict(result.report)}


@task(name="select-and-publish", cache_policy=NO_CACHE, persist_result=False)
def select_and_publish(run: build.BuildRun, held: locks.Held) -> build.BuildSummary:
    return build.select_and_publish(run, held)


def artifact_key(name: str, what: str) -> str:
    # Artifact keys take lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{name}-{what}".lower())


def _link(uri: str) -> str:
    """A link a browser opens: local paths become file:// URLs, other URIs stay."""
    return uri if "://" in uri else Path(uri).resolve().as_uri()


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
    if summary.report:
        lines += [f"Report (score distributions, margins, systems, drops and vetoes, sample "
                  f"pairs): [{summary.report}]({_link(summary.report)})", ""]
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


def open_shard_runner(config: RunnerConfig):
    """The task runner the shards go to, as a context manager: threads in this process, one
    shard at a time (the default), or a Dask cluster (`pipelines.dask_runner`)."""
    if config.kind == "dask":
        from pipelines import dask_runner

        return dask_runner.open_runner(config)
    return ThreadPoolTaskRunner(max_workers=1)


@flow(name="cpo-data-build", task_runner=ThreadPoolTaskRunner(max_workers=1),
      validate_parameters=False)
def build_triplets(config: str | BuildConfig, retries: int | None = None) -> dict:
    """Build and publish one version of the triplet dataset from a YAML config (or a loaded
    `BuildConfig`). Returns the build summary as a dict."""
    if not isinstance(config, BuildConfig):
        from pipelines.project import load_project

        config = load_project(config).need_build()
    # One writer per dataset, from the first step: a second build stops (or waits) here.
    with build.dataset_lock(config) as held:
        summary = _build(config, retries, held)
    logger = get_run_logger()
    if summary.unchanged:
        logger.info("unchanged: the triplets equal version %s of %s; nothing published",
                    summary.version, summary.dataset_uri)
    else:
        logger.info("published %s version %s: %d triplets", summary.dataset_uri,
                    summary.version, summary.triplets)
    create_artifacts(summary, config.publish.name)
    if not summary.unchanged:  # a training deployment would train on the same data again
        emit_published(summary, config)
    return dataclasses.asdict(summary)


def _build(config: BuildConfig, retries: int | None, held: locks.Held) -> build.BuildSummary:
    logger = get_run_logger()
    run = build.start_build(config)
    config = run.config
    logger.info("%d sources (%s) in %d shard(s) of up to %d", run.summary.sources,
                ", ".join(run.ingested.report.files), len(run.shards), config.shard_size)
    options: dict[str, Any] = {}
    if retries is not None:
        options["retries"] = retries
    generate_task = generate_shard.with_options(**options)
    score_task = score_shard.with_options(**options)

    # Shards go to the tasks by reference: their sources are read from work_dir/shards where
    # they run, so neither the flow's parameters nor a Dask message carries a table.
    shards = [(shard, f"shard {number}/{len(run.shards)}")
              for number, shard in enumerate(run.shards, 1)]
    # The shards go to the runner the config names; the flow's own runs nothing else. Every
    # result is read before that runner closes: a Dask future needs its cluster.
    with open_shard_runner(config.runner) as runner:
        # Every shard's generation, then every shard's scoring. Submitted together, a shard's
        # scoring would start as soon as its candidates are in (Dask) or between two shards'
        # generation (threads), and each switch would release one stage's models to load the
        # other's (`loaded.release`): a 13B model read again per shard. Finished stages come
        # from work_dir/shards in either phase, so a rerun resumes where the last stopped.
        generating = [runner.submit(generate_task, {
            "shard": shard, "config": config, "label": label}) for shard, label in shards]
        # Any shard failing raises here, before any scoring starts and anything is published.
        generated_results = [future.result() for future in generating]
        scoring = [runner.submit(score_task, {
            "generated": generated, "shard": shard, "config": config, "label": label})
            for generated, (shard, label) in zip(generating, shards, strict=True)]
        scored_results = [future.result() for future in scoring]
    # A stage an earlier run finished is not counted again. The results are reports only:
    # the shards' tables stay in work_dir/shards until selection reads them one by one.
    for generated, scored in zip(generated_results, scored_results, strict=True):
        build.add_shard(run, GenerateReport(**generated["report"]),
                        ScoreReport(**scored["report"]), generated_now=not generated["reused"],
                        scored_now=not scored["reused"], generated_on=generated.get("process"),
                        scored_on=scored.get("process"))
    summary = run.summary
    if config.runner.kind == "dask":
        logger.info("shard tasks ran in %d worker process(es): %s", len(summary.workers),
                    summary.workers or "none (all reused)")
    logger.info("generated %s, scored %s; %d of %d shards reused from an earlier run",
                summary.generated or "nothing", summary.scored or "nothing",
                summary.shards_reused, len(run.shards))
    return select_and_publish(run, held)  # in a task thread: the lock is handed over
