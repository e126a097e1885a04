"""Candidates per source: provided system outputs plus translations from generator models.

The provided outputs are those of `provided_systems`, and on a row with a human label both
labelled outputs (so that both sides of a labelled pair are scored).

Identical texts for one source collapse into one row listing every system that produced it; an
empty output is dropped with the reason `empty_output`. A row says whether the text is a
generation cut at `max_new_tokens` (`stopped_at_limit`): only when every generator that gave it
stopped there and no provided system gave it, since one finished output of the same text shows
the text is whole. With a cache, a generator runs only for sources it has not translated
before under the same identity (model weights, adapter, decoding, prompt), so adding sources
to a build generates only for the new ones.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import pyarrow as pa

from cpo_data import schema
from cpo_data.cache import cached_compute, cached_compute_each, identity_key, open_cache
from cpo_data.config import GenerateConfig
from cpo_data.drops import Drops
from cpo_data.errors import UserError

EMPTY_OUTPUT = "empty_output"
REQUEST_FAILED = "request_failed"
"""A served model's request that failed for good: that source lacks its candidate."""

log = logging.getLogger(__name__)


class GenerateError(UserError):
    """Generation that cannot run as configured; the message says what to change."""


@dataclass(frozen=True)
class Request:
    """One source to translate."""

    source_id: str
    src_lang: str
    tgt_lang: str
    src: str


@dataclass
class Generated:
    """A generator's candidates for one request, best first."""

    texts: list[str]
    truncated: bool = False
    """The source was longer than the model allows and was cut."""
    stopped_at_limit: list[bool] | None = None
    """Per text: the generation ran to `max_new_tokens` without ending. None: not known (a
    generator that does not say, or a cache entry written before the flag existed)."""
    failed: str | None = None
    """Why a served model's request failed for good (the status and the server's message);
    then there are no texts, and nothing is cached."""


class Generator(Protocol):
    """What the candidates stage needs from a model; the HF backend is one implementation."""

    name: str
    """System name the candidates carry."""
    identity: dict[str, Any]
    """What decides the outputs (weights fingerprint, decoding, prompt): the cache key."""

    def generate(self, requests: Sequence[Request]) -> list[Generated]:
        """Candidates for each request, in the same order."""
        ...


@runtime_checkable
class StreamingGenerator(Generator, Protocol):
    """A generator whose candidates arrive one source at a time (requests to a server): each
    is cached as it comes, so a run killed mid-way never pays for a candidate twice."""

    def generate_each(self, requests: Sequence[Request],
                      done: Callable[[int, Generated], None]) -> None:
        """Call `done(index, candidates)` once per request, as each finishes, in any order."""
        ...

    max_failed_share: float
    """Share of a shard's sources whose request may fail for good before the stage stops."""

    def request_counts(self) -> dict[str, int]:
        """What this object's requests did: sent, retried, failed, and the tokens."""
        ...


@dataclass
class GenerateReport:
    """What the candidates stage did, per system."""

    provided: dict[str, int] = field(default_factory=dict)
    """Candidates taken from provided columns, per system."""
    generated: dict[str, int] = field(default_factory=dict)
    """Sources a generator translated in this run, per system."""
    from_cache: dict[str, int] = field(default_factory=dict)
    """Sources served from the cache, per system."""
    truncated: dict[str, int] = field(default_factory=dict)
    """Sources cut to the model's limit, per system."""
    requests: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per served model: requests sent, retried, failed, prompt and completion tokens."""
    empty_outputs: int = 0
    merged_duplicates: int = 0
    """Candidate texts that another system of the same source already produced."""
    candidates: int = 0


@dataclass
class Candidates:
    """The candidates table, the outputs dropped on the way, and the report."""

    table: pa.Table
    dropped: pa.Table
    report: GenerateReport


def request_key(request: Request) -> str:
    """Cache key of one source under a fixed identity: its direction and text."""
    text = f"{request.src_lang}-{request.tgt_lang}\n{request.src}"
    return hashlib.sha256(text.encode()).hexdigest()


def _to_json(generated: Generated) -> dict[str, Any]:
    return {"texts": generated.texts, "truncated": generated.truncated,
            "stopped_at_limit": generated.stopped_at_limit}


def _from_json(value: dict[str, Any]) -> Generated:
    return Generated(**value)  # entries written before `stopped_at_limit` lack it


def _run_generator(generator: Generator, requests: list[Request], cache_dir: str | None,
                   report: GenerateReport) -> list[Generated]:
    name = generator.name
    cache = open_cache(cache_dir, "generate", generator.identity) if cache_dir else None
    if isinstance(generator, StreamingGenerator):
        try:
            results, generated = cached_compute_each(
                cache, requests, request_key, generator.generate_each, _to_json, _from_json,
                keep=lambda g: g.failed is None)
        finally:
            report.requests[name] = generator.request_counts()
        # Against the whole shard, cached sources included: a rerun that asks again only for
        # the one source a server always refuses must pass where the first run passed.
        failed = [g.failed for g in results if g.failed is not None]
        if len(failed) > generator.max_failed_share * len(requests):
            raise GenerateError(
                f"{name}: {len(failed)} of {len(requests)} sources' requests failed, more "
                f"than max_failed_share {generator.max_failed_share}; the first: {failed[0]}")
    else:
        results, generated = cached_compute(cache, requests, request_key, generator.generate,
                                            _to_json, _from_json)
    report.generated[name] = generated
    report.from_cache[name] = len(requests) - generated
    report.truncated[name] = sum(g.truncated for g in results)
    if report.truncated[name]:
        log.warning("%s: %d of %d sources were longer than the model allows and were truncated",
                    name, report.truncated[name], len(results))
    return results


PROVIDED = "provided"
"""What a provided output says about stopping at the limit: it is a finished text."""


def stopped_at_limit(said: list[bool | str | None]) -> bool | None:
    """Whether a candidate text is a generation cut at `max_new_tokens`, from what each output of
    that text said: `PROVIDED`, or a generator's flag (True, False, None: not known). True only
    if every generator that gave it stopped at the limit and no provided system gave it. None
    for a text only provided systems gave (nothing to check), and for one that no output shows
    finished but a generator gave without saying."""
    generated = [flag for flag in said if flag != PROVIDED]
    if not generated:
        return None
    if PROVIDED in said or False in generated:
        return False
    return True if all(generated) else None


def provided_systems(sources: pa.Table, config: GenerateConfig, check: bool = True) -> set[str]:
    """The provided systems that become candidates; with `check`, naming one the sources lack
    is an error."""
    present = {s["system"] for row in sources.column("systems").to_pylist() for s in row}
    wanted = set(present if config.provided_systems is None else config.provided_systems)
    unknown = wanted - present
    if check and unknown and sources.num_rows:
        raise GenerateError(
            f"provided_systems: {sorted(unknown)} not in the sources (they have {sorted(present)})")
    return wanted


def generate_candidates(
    sources: pa.Table,
    config: GenerateConfig,
    generators: Sequence[Generator] = (),
    check_systems: bool = True,
) -> Candidates:
    """The candidates table for `sources`: provided outputs, then each generator's.
    `check_systems`: refuse a provided system that `sources` lack. A build checks its whole
    dataset once (`build.check_build`) and not each shard, which may well lack a system that
    others have (every output of it empty there)."""
    sources = schema.validate(sources, schema.SOURCES, what="sources")
    wanted = provided_systems(sources, config, check=check_systems)
    rows = sources.to_pylist()
    report = GenerateReport()
    for row in rows:
        if not row["src"].strip():
            raise GenerateError(f"source {row['source_id']} ({row['origin']}): empty source text")

    # source_id -> text -> candidate row; dicts keep first-seen order.
    by_source: dict[str, dict[str, dict]] = {row["source_id"]: {} for row in rows}
    dropped = Drops()

    # (source_id, text) -> what each output of that text said about stopping at the limit.
    stops: dict[tuple[str, str], list[bool | str | None]] = {}

    def add(row: dict, system: str, text: str | None, generator: str | None,
            decoding: str | None, index: int = 0,
            stopped: bool | str | None = PROVIDED) -> bool:
        """Add one output; False when it was empty and dropped."""
        text = (text or "").strip()
        if not text:
            dropped.add(row["source_id"], row["lang_pair"], EMPTY_OUTPUT,
                        f"{system} candidate {index}")
            return False
        texts = by_source[row["source_id"]]
        stops.setdefault((row["source_id"], text), []).append(stopped)
        if text in texts:
            report.merged_duplicates += 1
            if system not in texts[text]["systems"]:
                texts[text]["systems"].append(system)
            return True
        texts[text] = {"source_id": row["source_id"], "text": text, "systems": [system],
                       "generator": generator, "decoding": decoding}
        return True

    def count_provided(system: str) -> None:
        report.provided[system] = report.provided.get(system, 0) + 1

    for row in rows:
        if config.include_reference and row["ref"]:
            if add(row, config.reference_name, row["ref"], None, None):
                count_provided(config.reference_name)
        # A labelled row's two sides are candidates even when `provided_systems` leaves their
        # systems out, so that both get scored: the published pair then carries both scores
        # and the label can be checked against them.
        labelled = {row["human_preferred"], row["human_dispreferred"]} - {None}
        for output in row["systems"]:
            system = output["system"]
            if (system in wanted or system in labelled) and add(row, system, output["text"],
                                                                 None, None):
                count_provided(system)

    requests = [Request(r["source_id"], r["src_lang"], r["tgt_lang"], r["src"]) for r in rows]
    for generator in generators:
        if generator.name in wanted or generator.name == config.reference_name:
            raise GenerateError(f"models: {generator.name!r} is also a provided system's name")
        decoding = json.dumps(generator.identity.get("decoding", {}), sort_keys=True)
        key = identity_key(generator.identity)
        results = _run_generator(generator, requests, config.cache_dir, report)
        for row, result in zip(rows, results, strict=True):
            if result.failed is not None:
                dropped.add(row["source_id"], row["lang_pair"], REQUEST_FAILED,
                            f"{generator.name}: {result.failed}")
                continue
            flags = result.stopped_at_limit or [None] * len(result.texts)
            for index, (text, stopped) in enumerate(zip(result.texts, flags, strict=True)):
                add(row, generator.name, text, key, decoding, index, stopped)

    candidates = [candidate for texts in by_source.values() for candidate in texts.values()]
    for candidate in candidates:
        candidate["stopped_at_limit"] = stopped_at_limit(
            stops[(candidate["source_id"], candidate["text"])])
    table = pa.Table.from_pylist(candidates, schema=schema.CANDIDATES)
    report.candidates = table.num_rows
    report.empty_outputs = dropped.counts().get(EMPTY_OUTPUT, 0)
    return Candidates(table=table, dropped=dropped.table(), report=report)
