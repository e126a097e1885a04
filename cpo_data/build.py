"""The build's stages as plain functions: check, shard, generate, score, select, publish.

The Prefect flow (`pipelines/build.py`) wires these as tasks; `run_build` wires them in a
plain loop, for library use and for measuring what Prefect itself costs (`bench/build.py`).
Nothing here imports Prefect.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cpo_data import __version__, guards, locks, publishing, schema, select, sources, staging, store
from cpo_data.config import BuildConfig, ConfigError
from cpo_data.fingerprint import generator_weights, scorer_weights
from cpo_data.generate import (
    Candidates,
    GenerateReport,
    generate_candidates,
)
from cpo_data.identity import endpoint_identity, generator_identity, scorer_identity
from cpo_data.report import REPORT_FILE
from cpo_data.report import attachment as report_page
from cpo_data.score import ScoreReport, Scores, score_candidates

log = logging.getLogger(__name__)


def _missing_local(path: str) -> bool:
    """A path written as local (./, /, ~) that is not there; hub ids and URIs are not paths."""
    return path.startswith((".", "/", "~")) and not Path(path).expanduser().exists()


def check_build(config: BuildConfig, scan: sources.Scan) -> None:
    """Refuse a build that cannot work, before any model loads; errors name the config key.
    `scan`: what the first read of the sources found (`sources.scan_sources`)."""
    for i, model in enumerate(config.generate.models):
        if _missing_local(model.model):
            raise ConfigError(f"generate.models[{i}].model: {model.model} does not exist")
    for i, endpoint in enumerate(config.generate.endpoints):
        try:
            endpoint.api_key()
        except ConfigError as error:
            raise ConfigError(f"generate.endpoints[{i}].{error}") from None
    for i, scorer in enumerate(config.score.scorers):
        if scorer.model and _missing_local(scorer.model):
            raise ConfigError(f"score.scorers[{i}].model: {scorer.model} does not exist")
        if scorer.needs_reference and scan.report.rows_read and not scan.has_reference:
            what = "use_reference is set" if scorer.kind == "comet" else f"{scorer.kind} needs one"
            raise ConfigError(f"score.scorers[{i}] ({scorer.name}): {what}, and no source has a "
                              "reference (map sources[].ref_column, or use a reference-free "
                              "scorer)")
    wanted = config.generate.provided_systems
    unknown = set(wanted or ()) - scan.systems
    if unknown and scan.report.rows_read:
        raise ConfigError(f"generate.provided_systems: {sorted(unknown)} not in the sources "
                          f"(they have {sorted(scan.systems)})")


def _check_source_paths(config: BuildConfig) -> None:
    """A missing source file is named by its config key."""
    for i, source in enumerate(config.sources):
        if "://" not in source.path and not Path(source.path).expanduser().exists():
            raise ConfigError(f"sources[{i}].path: {source.path} does not exist")


def load_build_sources(config: BuildConfig) -> sources.Sources:
    """The sources of a build as one table (a build itself reads them in parts)."""
    _check_source_paths(config)
    return sources.load_sources(config.sources)


def with_work_dir(config: BuildConfig) -> BuildConfig:
    """Caches under `work_dir` unless the config names its own."""
    work = config.work_dir.rstrip("/")
    generate, score = config.generate, config.score
    if generate.cache_dir is None:
        generate = dataclasses.replace(generate, cache_dir=f"{work}/cache")
    if score.cache_dir is None:
        score = dataclasses.replace(score, cache_dir=f"{work}/cache")
    return dataclasses.replace(config, generate=generate, score=score)


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def shard_key(stage: str, shard: pa.Table, inputs: list[Any]) -> str:
    """Content key of one shard's work: its rows, what decides the stage's outputs (`inputs`,
    from `stage_inputs`) and the schemas of the tables a shard hands on, written out in full:
    SCHEMA_VERSION counts published columns, and a column added to the candidates alone must
    not find a shard cached without it. Run ids play no part, so a rerun finds finished
    shards; batch sizes, budgets and devices play none either."""
    tables = [str(t) for t in (schema.CANDIDATES, schema.SCORES, schema.DROPPED)]
    return f"{stage}-" + _digest([schema.SCHEMA_VERSION, tables, __version__, shard.to_pylist(),
                                  inputs])[:40]


def stage_inputs(config: BuildConfig) -> dict[str, Any]:
    """What decides each stage's outputs besides the rows: the same backend identities the
    content caches key on (computed without loading a model), the system and score names the
    tables carry, and the stage settings that shape the tables."""
    generate, score = config.generate, config.score
    return {
        "generate": {
            "provided_systems": generate.provided_systems,
            "include_reference": generate.include_reference,
            "reference_name": generate.reference_name,
            "models": [{"name": m.name, **generator_identity(m)} for m in generate.models],
            "endpoints": [{"name": e.name, **endpoint_identity(e)} for e in generate.endpoints],
        },
        "score": {
            "scorers": [{"name": s.name, **scorer_identity(s)} for s in score.scorers],
            "ensembles": [dataclasses.asdict(e) for e in score.ensembles],
        },
    }


def model_fingerprints(config: BuildConfig, stage: str) -> list[str]:
    """What identifies the weights a stage uses (cheap: names, sizes, first and last MiB)."""
    if stage == "generate":
        return [generator_weights(m) for m in config.generate.models]
    return [w for w in map(scorer_weights, config.score.scorers) if w is not None]


def generate_shard(shard: pa.Table, config: BuildConfig) -> Candidates:
    """Candidates for one shard: provided outputs and every configured model's. A model loads
    on its first cache miss and stays loaded in this process for its next shards, until a
    scorer loads on its device."""
    from cpo_data.backends import loaded
    from cpo_data.backends.openai_generate import load_endpoint

    with loaded.in_use:
        generators = [loaded.LazyGenerator(m) for m in config.generate.models]
        generators += [load_endpoint(e) for e in config.generate.endpoints]
        return generate_candidates(shard, config.generate, generators, check_systems=False)


def score_shard(candidates: pa.Table, shard: pa.Table, config: BuildConfig) -> Scores:
    """Scores of one shard's candidates under every configured scorer (kept loaded, as the
    generators are). The first scorer to load on a device releases this process's generators
    there, so generation and scoring never hold one device together."""
    from cpo_data.backends import loaded

    with loaded.in_use:
        scorers = [loaded.LazyScorer(s) for s in config.score.scorers]
        return score_candidates(candidates, shard, config.score, scorers)


def staged_generate(shard: pa.Table, config: BuildConfig, key: str) -> tuple[Candidates, bool]:
    """The shard's candidates from `work_dir/shards` (`cpo_data.staging`) when an earlier run
    finished them, else generated now and kept there; and whether they were reused."""
    found = staging.load(config.work_dir, key)
    if found is not None:
        return Candidates(found.table, found.dropped, GenerateReport(**found.report)), True
    result = generate_shard(shard, config)
    staging.save(config.work_dir, key, result.table, result.dropped,
                 dataclasses.asdict(result.report))
    return result, False


def staged_candidates(config: BuildConfig, key: str) -> Candidates:
    """The candidates a finished generation stage kept (for its scoring and selection)."""
    found = staging.load(config.work_dir, key)
    if found is None:
        raise RuntimeError(f"{staging.staged_dir(config.work_dir)}/{key}: the shard's "
                           "candidates are gone since its generation finished")
    return Candidates(found.table, found.dropped, GenerateReport(**found.report))


def staged_score(shard: pa.Table, config: BuildConfig, key: str,
                 generate_key: str) -> tuple[Scores, bool]:
    """The shard's scores from `work_dir/shards` when an earlier run finished them, else
    scored now (over the staged candidates) and kept there; and whether they were reused."""
    # Scores are only as good as the candidates they were computed on: a generation stage
    # made again (its files were damaged) may hold other samples.
    inputs = {"candidates": staging.table_sha256(config.work_dir, generate_key) or ""}
    found = staging.load(config.work_dir, key, inputs)
    if found is not None:
        return Scores(found.table, found.dropped, ScoreReport(**found.report)), True
    candidates = staged_candidates(config, generate_key)
    result = score_shard(candidates.table, shard, config)
    staging.save(config.work_dir, key, result.table, result.dropped,
                 dataclasses.asdict(result.report), inputs)
    return result, False


@dataclass
class BuildSummary:
    """What a build did: the summary the CLI prints and the flow returns."""

    dataset_uri: str
    version: str
    triplets: int
    sources: int
    shards: int
    shards_reused: int = 0
    """Shards whose finished work an earlier run left (Prefect's task cache)."""
    generated: dict[str, int] = field(default_factory=dict)
    """Sources each model translated in this run (cache hits excluded)."""
    generated_from_cache: dict[str, int] = field(default_factory=dict)
    scored: dict[str, int] = field(default_factory=dict)
    """Distinct pairs each scorer ran on in this run (cache hits excluded)."""
    scored_from_cache: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    """Dropped rows per reason, all stages."""
    vetoed: dict[str, int] = field(default_factory=dict)
    """Candidates per guard that vetoed them (also among `dropped`)."""
    guarded: int = 0
    """Candidates the guards checked (every one but the reference's)."""
    min_margin: float = 0.0
    """The smallest margin a pair was kept with: `select.min_margin`, else the ranking
    score's noise threshold."""
    report: str | None = None
    """Where the version's `report.html` is (null with `publish.report` off)."""
    lang_pairs: dict[str, int] = field(default_factory=dict)
    systems: list[dict] = field(default_factory=list)
    """Per system: chosen and rejected counts (ALMA-R's Table 2)."""
    agreement: dict[str, int] = field(default_factory=dict)
    """Where sources carry human labels: how often the ranking score agrees."""
    score_summary: dict[str, dict[str, float]] = field(default_factory=dict)
    """Per score column: count, mean, min, max over scored candidates; and the margins."""
    previous_version: str | None = None
    """The dataset's newest version before this build, if any."""
    unchanged: bool = False
    """The triplets and dropped rows equal the previous version's: nothing was published,
    and `version` is the previous version."""
    sources_new: int = 0
    """Sources that the previous version did not hold (all of them on a first build)."""
    sources_reused: int = 0
    """Sources the previous version held already (as a triplet or a dropped row)."""
    ingestion: dict[str, int] = field(default_factory=dict)
    """What reading the sources did: rows read, sources kept, duplicates collapsed into an
    earlier source, empty provided outputs."""
    truncated: dict[str, dict[str, int]] = field(default_factory=dict)
    """Inputs cut to a model's limit: sources per generator (`generate`, every shard) and
    segments per COMET scorer (`score`, those scored in this run)."""
    workers: dict[str, int] = field(default_factory=dict)
    """Shard tasks (generate, score) run in this build, per process (host:pid): the flow's
    own, or each Dask worker's. Work an earlier run left is not counted."""
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per served model (`generate.endpoints`), in this run: requests sent, retried, failed,
    and the prompt and completion tokens they cost."""


@dataclass(frozen=True)
class Shard:
    """One shard of a build, by reference: its sources are kept in `work_dir/shards` under
    `sources_key` (`staging`), so tasks and the flow pass keys, never tables."""

    sources_key: str
    rows: int
    generate_key: str
    score_key: str


@dataclass
class Ingested:
    """What reading the sources left for selection and the provenance, none of it per row but
    the ids' 8-byte digests."""

    report: sources.SourcesReport
    ids: Any
    """The sources' id digests, sorted (`sources.Scan.ids`): the "new since" count."""
    dropped: pa.Table
    """Sources lost merging duplicates (`conflicting_duplicate`); each shard keeps its own
    empty outputs."""
    fingerprint: str
    context: guards.Context
    """The guards' context, learned over every shard."""


@dataclass
class BuildRun:
    """One build in progress: its config, its shards (kept in `work_dir/shards`), and what
    the shards gave."""

    config: BuildConfig
    ingested: Ingested
    shards: list[Shard]
    weights: dict[str, list[str]]
    """Weight fingerprints per stage (generate, score), for the provenance."""
    inputs: dict[str, Any]
    """What decides each stage's outputs (`stage_inputs`): in the shard keys."""
    summary: BuildSummary


def sources_key(part: sources.Part) -> str:
    """Content key of one part of the sources: its rows, carried scores and drops."""
    return "sources-" + _digest([schema.SCHEMA_VERSION, str(schema.SOURCES), __version__,
                                 part.table.to_pylist(), part.scores.to_pylist(),
                                 part.dropped.to_pylist()])[:40]


def _stage_part(config: BuildConfig, part: sources.Part) -> str:
    key = sources_key(part)
    if staging.load(config.work_dir, key) is None:  # an earlier build may have kept it
        staging.save(config.work_dir, key, part.table, part.dropped, {}, scores=part.scores)
    return key


def shard_sources(config: BuildConfig, shard: Shard) -> staging.Staged:
    """A shard's sources (`table`), carried scores (`scores`) and ingestion drops (`dropped`)."""
    found = staging.load(config.work_dir, shard.sources_key)
    if found is None:
        raise RuntimeError(f"{staging.staged_dir(config.work_dir)}/{shard.sources_key}: the "
                           "shard's sources are gone since the build read them")
    return found


def shard_table(config: BuildConfig, shard: Shard) -> pa.Table:
    return shard_sources(config, shard).table


def start_build(config: BuildConfig) -> BuildRun:
    """Everything before the first model loads: caches under work_dir, the sources read in
    shards into `work_dir/shards` (a first read checks every row and the config against them;
    nothing is written before it passes), and the shards' keys."""
    config = with_work_dir(config)
    staging.sweep(config.work_dir)  # what a killed build left half-written
    _check_source_paths(config)
    scan = sources.scan_sources(config.sources)
    check_build(config, scan)
    inputs = stage_inputs(config)
    merged, conflicts = sources.merge_repeated(scan)
    context = guards.ContextBuilder(config.guards)
    fingerprint = hashlib.sha256()
    parts = []
    for part in sources.read_parts(scan, merged, config.shard_size):
        context.add(part.table)
        sources.add_to_fingerprint(fingerprint, part.table)
        generate_key, score_key = _stage_keys(inputs, part.table)
        parts.append(Shard(_stage_part(config, part), part.table.num_rows, generate_key,
                           score_key))
    report = scan.report
    summary = BuildSummary(dataset_uri=store.dataset_uri(config.publish.uri, config.publish.name),
                           version="", triplets=0, sources=report.sources,
                           shards=len(parts), ingestion={
                               "rows_read": report.rows_read, "sources": report.sources,
                               "duplicates_collapsed": report.duplicates_collapsed,
                               "empty_system_outputs": report.empty_system_outputs})
    weights = {stage: model_fingerprints(config, stage) for stage in ("generate", "score")}
    ingested = Ingested(report, scan.ids, conflicts, fingerprint.hexdigest(), context.context())
    return BuildRun(config, ingested, parts, weights, inputs, summary)


def _stage_keys(inputs: dict[str, Any], table: pa.Table) -> tuple[str, str]:
    return (shard_key("generate", table, [inputs["generate"]]),
            shard_key("score", table, [inputs["generate"], inputs["score"]]))


def shard_keys(run: BuildRun, shard: pa.Table) -> tuple[str, str]:
    """The generation and scoring keys of one shard's sources. The score key covers what
    generation depends on too: the candidates are its input."""
    return _stage_keys(run.inputs, shard)


def _add(total: dict[str, int], counts: dict[str, int]) -> None:
    """Sum per-name counts, keeping zeros: "tiny 0" says the model ran on nothing new."""
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def process_name() -> str:
    """host:pid of this process: names where a shard's work ran (a Dask worker or the flow)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def add_shard(run: BuildRun, generated: GenerateReport, scored: ScoreReport,
              generated_now: bool = True, scored_now: bool = True,
              generated_on: str | None = None, scored_on: str | None = None) -> None:
    """Count one shard's work (its stages' reports) only where it was done in this run, and
    by which process (`generated_on`, `scored_on`: their `process_name()`). Its tables stay
    in `work_dir/shards` until selection reads them, one shard at a time."""
    summary = run.summary
    _add(summary.truncated.setdefault("generate", {}), generated.truncated)
    if scored_now:
        _add(summary.truncated.setdefault("score", {}), scored.truncated)
    if generated_now:
        _add(summary.generated, generated.generated)
        for name, counts in generated.requests.items():
            _add(summary.requests.setdefault(name, {}), counts)
        _add(summary.generated_from_cache, generated.from_cache)
        if generated_on:
            _add(summary.workers, {generated_on: 1})
    if scored_now:
        _add(summary.scored, scored.scored)
        _add(summary.scored_from_cache, scored.from_cache)
        if scored_on:
            _add(summary.workers, {scored_on: 1})
    else:
        summary.shards_reused += 1


@dataclass
class _Running:
    """count, mean, min and max of a stream of values, as `_stats` gives them at the end."""

    count: int = 0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: list[float]) -> None:
        for value in values:
            if value is not None and math.isfinite(value):
                self.count += 1
                self.total += value
                self.low, self.high = min(self.low, value), max(self.high, value)

    def stats(self) -> dict[str, float]:
        if not self.count:
            return {"count": 0}
        return {"count": self.count, "mean": self.total / self.count, "min": self.low,
                "max": self.high}


def _compare_with_previous(summary: BuildSummary, run: BuildRun) -> None:
    """How many of this build's sources are new since the dataset's newest version (by the
    ids' digests: 8 bytes a source, on both sides)."""
    ids = run.ingested.ids
    try:
        previous = store.read_manifest(summary.dataset_uri)["version"]
    except store.StoreError:  # a first build: no dataset or no version yet
        summary.sources_new = len(ids)
        return
    before = store.read_source_digests(summary.dataset_uri, previous)
    summary.previous_version = previous
    reused = int(np.isin(ids, before, assume_unique=True).sum())
    summary.sources_new = len(ids) - reused
    summary.sources_reused = reused


def _scores_for_selection(config: BuildConfig, carried: pa.Table,
                          computed: list[pa.Table]) -> pa.Table | None:
    """The stages' scores, and the scores the sources carry (ALMA-R layout) under every name
    no scorer or ensemble of this build produces: a computed score replaces a carried one."""
    names = config.score.names
    if names and carried.num_rows:
        carried = carried.filter(pc.invert(pc.is_in(carried["scorer"], pa.array(names))))
    tables = [t for t in (carried, *computed) if t.num_rows]
    return pa.concat_tables(tables) if tables else None


@dataclass
class _Tally:
    """What selection over every shard adds up to, for the summary and the provenance."""

    candidates: int = 0
    dropped: Counter = field(default_factory=Counter)
    vetoed: Counter = field(default_factory=Counter)
    guarded: int = 0
    lang_pairs: Counter = field(default_factory=Counter)
    report: select.SelectReport = field(default_factory=select.SelectReport)
    scores: dict[str, _Running] = field(default_factory=dict)
    margins: _Running = field(default_factory=_Running)

    def add_selection(self, report: select.SelectReport) -> None:
        total = self.report
        total.sources += report.sources
        total.triplets += report.triplets
        for mine, theirs in ((total.by_method, report.by_method), (total.dropped,
                             report.dropped), (total.chosen, report.chosen),
                             (total.rejected, report.rejected)):
            _add(mine, theirs)
        for name in ("labelled", "compared", "agree", "ties"):
            setattr(total.agreement, name, getattr(total.agreement, name)
                    + getattr(report.agreement, name))

    def add_scores(self, scores: pa.Table | None) -> None:
        if scores is None or not scores.num_rows:
            return
        by_scorer: dict[str, list[float]] = {}
        for name, value in zip(scores.column("scorer").to_pylist(),
                               scores.column("score").to_pylist(), strict=True):
            by_scorer.setdefault(name, []).append(value)
        for name, values in by_scorer.items():
            self.scores.setdefault(name, _Running()).add(values)


def _select_shard(run: BuildRun, shard: Shard, tally: _Tally) -> tuple[pa.Table, pa.Table]:
    """One shard's triplets and dropped rows, from its kept stages; counted into `tally`."""
    config = run.config
    kept = shard_sources(config, shard)
    candidates = staged_candidates(config, shard.generate_key)
    found = staging.load(config.work_dir, shard.score_key,
                         {"candidates": staging.table_sha256(config.work_dir,
                                                             shard.generate_key) or ""})
    if found is None:
        raise RuntimeError(f"{staging.staged_dir(config.work_dir)}/{shard.score_key}: the "
                           "shard's scores are gone since its scoring finished")
    carried = kept.scores if kept.scores is not None else schema.empty(schema.SCORES)
    scores = _scores_for_selection(config, carried, [found.table])
    vetoes = guards.check_candidates(kept.table, candidates.table, config.guards,
                                     config.generate.reference_name, scores,
                                     run.ingested.context)
    selection = select.select_triplets(kept.table, candidates.table, scores, config.selection,
                                       vetoes.by_candidate)
    dropped = pa.concat_tables([kept.dropped, candidates.dropped, found.dropped,
                                vetoes.dropped.table(), selection.dropped])
    tally.candidates += candidates.table.num_rows
    tally.dropped.update(dropped.column("reason").to_pylist())
    tally.vetoed.update(vetoes.dropped.counts())
    tally.guarded += vetoes.checked
    tally.lang_pairs.update(selection.triplets.column("lang_pair").to_pylist())
    tally.add_selection(selection.report)
    tally.add_scores(scores)
    tally.margins.add(selection.triplets.column("margin").to_pylist())
    return selection.triplets, dropped


def select_and_publish(run: BuildRun, held: locks.Held | None = None) -> BuildSummary:
    """Pick pairs shard by shard, from the stages kept under `work_dir/shards`, straight into
    the new version's files (`publishing.VersionWriter`), and fill the summary. Called only
    once every shard finished, so nothing half-built is published; no step holds more than
    one shard's candidates, scores and pairs. `held`: the dataset's lock, where the caller
    holds it in another thread (the flow's publish runs in a task's thread)."""
    config, summary = run.config, run.summary
    rules, publish = config.selection, config.publish
    context, conflicts = run.ingested.context, run.ingested.dropped
    _compare_with_previous(summary, run)
    tally = _Tally()
    tally.dropped.update(conflicts.column("reason").to_pylist())
    with publishing.VersionWriter(publish.uri, publish.name, license=publish.license,
                                  conversational=publish.conversational,
                                  lock_wait_s=publish.lock_wait_s, held=held) as writer:
        writer.add(schema.empty(schema.TRIPLETS), conflicts)  # merging duplicates' drops
        for shard in run.shards:
            writer.add(*_select_shard(run, shard, tally))
        report = tally.report
        provenance = {
            "cpo_data_version": __version__,
            "config": dataclasses.asdict(config),
            "source_files": run.ingested.report.files,
            "source_fingerprint": run.ingested.fingerprint,
            "rank_by": config.rank_by,
            "generators": run.weights["generate"],
            "scorers": run.weights["score"],
            "ingestion": summary.ingestion,
            "truncated": summary.truncated,
            "requests": summary.requests,
            "length_windows": context.windows,
            "vetoes": dict(tally.vetoed),
            # How often the ranking score agrees with the sources' human labels (the report's).
            "agreement": dataclasses.asdict(report.agreement),
            "guarded": tally.guarded,
            "min_margin": rules.margin_floor,
            "noise_thresholds": rules.noise_thresholds,
        }
        summary.version = writer.finish(provenance,
                                        attachments=report_page if publish.report else None)
    summary.unchanged = summary.version == summary.previous_version
    if publish.report:
        summary.report = f"{summary.dataset_uri.rstrip('/')}/{summary.version}/{REPORT_FILE}"
    summary.triplets = report.triplets
    summary.candidates = tally.candidates
    summary.dropped = dict(tally.dropped)
    summary.vetoed, summary.guarded = dict(tally.vetoed), tally.guarded
    summary.min_margin = rules.margin_floor
    summary.lang_pairs = dict(tally.lang_pairs)
    summary.systems = select.system_counts(report)
    if report.agreement.labelled:
        summary.agreement = dataclasses.asdict(report.agreement)
    if tally.scores:
        summary.score_summary = {name: tally.scores[name].stats() for name in sorted(tally.scores)}
        summary.score_summary["margin"] = tally.margins.stats()
    return summary


def dataset_lock(config: BuildConfig):
    """The published dataset's one-writer lock, held by a build from its first step to its
    publish, so a second build of the dataset waits or stops before doing any work."""
    publish = config.publish
    return store.dataset_lock(publish.uri, publish.name, wait_s=publish.lock_wait_s,
                              what="a build")


def run_build(config: BuildConfig, progress: Callable[[str], None] = log.info) -> BuildSummary:
    """The whole build without Prefect: the same stages, every shard's generation, then every
    shard's scoring. In that order the generators are released once, when the first scorer
    loads on their device (`loaded.release`), instead of a 13B model being read again for each
    shard; `progress` hears of each shard once it is scored."""
    with dataset_lock(config) as held:
        return _run_build(config, progress, held)


def _run_build(config: BuildConfig, progress: Callable[[str], None],
               held: locks.Held) -> BuildSummary:
    run = start_build(config)
    config, count = run.config, len(run.shards)
    reused = []
    for number, shard in enumerate(run.shards, 1):
        candidates, was_reused = staged_generate(shard_table(config, shard), config,
                                                 shard.generate_key)
        reused.append((candidates.report, was_reused))
        log.info("generated shard %d/%d: %d sources, %d candidates%s", number, count,
                 shard.rows, candidates.table.num_rows, " (reused)" if was_reused else "")
    for number, (shard, (generated, generate_reused)) in enumerate(
            zip(run.shards, reused, strict=True), 1):
        scored, score_reused = staged_score(shard_table(config, shard), config,
                                            shard.score_key, shard.generate_key)
        add_shard(run, generated, scored.report, generated_now=not generate_reused,
                  scored_now=not score_reused, generated_on=process_name(),
                  scored_on=process_name())
        progress(f"shard {number}/{count}: {shard.rows} sources, "
                 f"{scored.table.num_rows} scores")
    return select_and_publish(run, held)
