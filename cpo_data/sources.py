"""Read source segments from JSONL, CSV/TSV, Parquet, saved HF datasets or the ALMA-R layout.

Every format is read into rows (row number, dict) first, by `cpo_data.source_formats`; one
function here turns rows into the sources table, so all formats share the same checks and the
same error messages. Rows are numbered from 1 in file order: for JSONL that is the line number,
for CSV/TSV the data row after the header.

Text is stripped of surrounding whitespace. An empty provided-system output is not a candidate: it
is a dropped row (`empty_system_output`, naming file:row), not an error. Duplicate sources (same
language pair and source text) collapse into their first occurrence, counted, not dropped; later
duplicates only add system outputs the first lacked, and an output, reference or label differing
from the first's is lost, so it is a dropped row (`conflicting_duplicate`). Not drops: blank lines
(no data), an empty reference (the source has none; scorers needing one drop `missing_reference`),
directions left out by `directions` or ALMA-R's `required_directions` (configured away), delta 0.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from cpo_data import schema
from cpo_data.config import ALMA_R_SCORES, SourcesConfig
from cpo_data.drops import Drops
from cpo_data.langs import UnknownLanguageError, get_language, lang_pair, normalize_code
from cpo_data.source_formats import SourceError as SourceError  # its documented home is here too
from cpo_data.source_formats import read_rows

ALMA_R_SYSTEMS = ("gpt4", "alma")
ALMA_R_SCORERS = ALMA_R_SCORES

EMPTY_SYSTEM_OUTPUT = "empty_system_output"
CONFLICTING_DUPLICATE = "conflicting_duplicate"


@dataclass
class SourcesReport:
    """What ingestion read, kept and collapsed."""

    files: list[str] = field(default_factory=list)
    rows_read: int = 0
    """Input rows (for alma_r: input rows times the directions each yields)."""
    sources: int = 0
    """Rows in the sources table."""
    duplicates_collapsed: int = 0
    """Input rows that repeated an earlier source and were merged into it."""
    empty_system_outputs: int = 0
    """Provided outputs that were empty and so are not candidates (each a dropped row)."""
    per_lang_pair: dict[str, int] = field(default_factory=dict)


@dataclass
class Sources:
    """The sources table, precomputed scores (ALMA-R layout; empty otherwise), the report and
    what ingestion left out."""

    table: pa.Table
    scores: pa.Table
    report: SourcesReport
    dropped: pa.Table = field(default_factory=lambda: schema.empty(schema.DROPPED))
    """Provided outputs and duplicate texts that did not reach the table, with reasons."""


def source_id(src_lang: str, tgt_lang: str, src: str) -> str:
    """Stable id of a source segment: a hash of its direction and text."""
    key = f"{lang_pair(src_lang, tgt_lang)}\n{src}".encode()
    return hashlib.sha256(key).hexdigest()[:20]


# ---- turning rows into sources --------------------------------------------------------------


@dataclass
class _Source:
    """One source being assembled, before it becomes a table row."""

    src_lang: str
    tgt_lang: str
    src: str
    ref: str | None
    systems: dict[str, str]
    origin: str
    preferred: str | None = None
    dispreferred: str | None = None
    delta: float | None = None
    duplicates: int = 1
    empty: list[tuple[str, str]] = field(default_factory=list)
    """Provided outputs that were empty, as (system, detail): each one that no duplicate of
    this source fills becomes a dropped row."""
    scores: list[dict] = field(default_factory=list)
    """Scores the row carried (ALMA-R layout), as SCORES rows."""


class _RowReader:
    """Reads typed fields out of one row and names the row and field when one is wrong."""

    def __init__(self, file: str, number: int, row: dict):
        self.file, self.number, self.row = file, number, row

    def error(self, name: str | None, message: str) -> SourceError:
        return SourceError(self.file, self.number, name, message)

    def text(self, name: str, *, required: bool, container: dict | None = None) -> str | None:
        row = self.row if container is None else container
        if name not in row:
            if not required:
                return None
            columns = ", ".join(map(str, row)) or "none"
            raise self.error(name, f"column not found (this row has: {columns})")
        value = row[name]
        if value is None:
            if required:
                raise self.error(name, "missing (null)")
            return None
        if not isinstance(value, str):
            raise self.error(name, f"expected text, got {type(value).__name__} {value!r:.40}")
        value = value.strip()
        if not value and required:
            raise self.error(name, "empty text")
        return value or None

    def lang(self, name: str, value: str | None = None) -> str:
        code = value if value is not None else self.text(name, required=True)
        try:
            return get_language(code).code
        except UnknownLanguageError as error:
            raise self.error(name, str(error)) from None

    def number_or_none(self, name: str, container: dict | None = None) -> float | None:
        row = self.row if container is None else container
        if name not in row:
            raise self.error(name, "column not found")
        value = row[name]
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if isinstance(value, bool):
            raise self.error(name, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise self.error(name, f"expected a number, got {value!r:.40}") from None
        if not math.isfinite(number):
            raise self.error(name, f"expected a finite number, got {value!r}")
        return number


def _apply_label(source: _Source, delta: float | None, positive: str, negative: str,
                 reader: _RowReader, label_field: str) -> None:
    if delta is None or delta == 0:  # ALMA-R: 0 means unlabelled or tied
        return
    better, worse = (positive, negative) if delta > 0 else (negative, positive)
    for name in (better, worse):
        if name not in source.systems:
            raise reader.error(label_field, f"labelled, but system {name!r} has no output")
    source.preferred, source.dispreferred, source.delta = better, worse, delta


def _outputs(reader: _RowReader, columns: dict[str, str],
             container: dict | None = None) -> tuple[dict[str, str], list[str]]:
    """Provided outputs per system, and the empty ones as (system, "file:row: system
    (column) is empty") for their drops."""
    systems, empty = {}, []
    where = "" if container is None else "translation."  # only ALMA-R rows nest their fields
    for name, column in columns.items():
        text = reader.text(column, required=False, container=container)
        if text is None:
            empty.append((name, f"{reader.file}:{reader.number}: {name} ({where}{column}) "
                                "is empty"))
        else:
            systems[name] = text
    return systems, empty


def _mapped_source(config: SourcesConfig, reader: _RowReader) -> _Source:
    src_lang = (reader.lang("src_lang", config.src_lang) if config.src_lang
                else reader.lang(config.src_lang_column))
    tgt_lang = (reader.lang("tgt_lang", config.tgt_lang) if config.tgt_lang
                else reader.lang(config.tgt_lang_column))
    if src_lang == tgt_lang:
        raise reader.error(config.tgt_lang_column or "tgt_lang",
                           f"source and target language are both {src_lang!r}")
    src = reader.text(config.src_column, required=True)
    ref = None
    if config.ref_column is not None:
        if config.ref_column not in reader.row:
            raise reader.error(config.ref_column, "column not found; set ref_column: null "
                               "if the data has no reference")
        ref = reader.text(config.ref_column, required=False)
    for name, column in config.systems.items():
        if column not in reader.row:
            raise reader.error(column, f"column not found (mapped as system {name!r})")
    systems, empty = _outputs(reader, config.systems)
    source = _Source(src_lang, tgt_lang, src, ref, systems,
                     origin=f"{reader.file}:{reader.number}", empty=empty)
    if config.label_column is not None:
        delta = reader.number_or_none(config.label_column)
        _apply_label(source, delta, config.label_positive, config.label_negative, reader,
                     config.label_column)
    return source


def _alma_r_sources(config: SourcesConfig, reader: _RowReader) -> list[_Source]:
    """One ALMA-R row holds both directions of a pair; yield those the row and config allow."""
    translation = reader.row.get("translation")
    if not isinstance(translation, dict):
        raise reader.error("translation", "alma_r rows need a `translation` struct")
    pair = reader.text("language_pair", required=True, container=translation)
    langs = pair.split("-")
    if len(langs) != 2:
        raise reader.error("language_pair", f"{pair!r} is not of the form xx-yy")
    first, second = (reader.lang("language_pair", code) for code in langs)
    required = reader.text("required_directions", required=False, container=translation)
    directions = [(first, second), (second, first)]
    if required:
        directions = [d for d in directions if lang_pair(*d) == normalize_code(required)]
    if config.directions:
        wanted = {normalize_code(d) for d in config.directions}
        directions = [d for d in directions if lang_pair(*d) in wanted]
    delta = (reader.number_or_none("Delta", translation) if "Delta" in translation else None)
    made = []
    for src_lang, tgt_lang in directions:
        src = reader.text(src_lang, required=True, container=translation)
        ref = reader.text(tgt_lang, required=False, container=translation)
        systems, empty = _outputs(reader, {s: f"{s}_{tgt_lang}" for s in ALMA_R_SYSTEMS},
                                  translation)
        source = _Source(src_lang, tgt_lang, src, ref, systems,
                         origin=f"{reader.file}:{reader.number}", empty=empty)
        _apply_label(source, delta, "gpt4", "alma", reader, "Delta")
        texts = dict(systems, ref=ref)
        sid = source_id(src_lang, tgt_lang, src)
        for system, text in texts.items():
            for scorer in ALMA_R_SCORERS:
                key = f"{system}_{tgt_lang}_{scorer}"
                value = reader.number_or_none(key, translation) if key in translation else None
                if text is not None and value is not None:
                    source.scores.append({"source_id": sid, "text": text, "scorer": scorer,
                                   "score": value, "error_spans": None})
        made.append(source)
    return made


def _merge(first: _Source, later: _Source, sid: str, drops: Drops) -> None:
    """Fold a later duplicate into its first occurrence. An output, reference or label the
    first lacks is taken from the later one, and one it has identically is already there, so
    neither is lost; one that differs from the first's has no place in the row: a drop."""
    first.duplicates += 1
    first.empty += later.empty  # dropped at the end, unless an occurrence has the output
    first.scores += later.scores  # where two give one text a score, the first one's is kept
    pair = lang_pair(first.src_lang, first.tgt_lang)
    lost = []
    for name, text in later.systems.items():
        if first.systems.setdefault(name, text) != text:  # setdefault adds what the first lacks
            lost.append(f"{name} output")
    if first.ref is None:
        first.ref = later.ref
    elif later.ref is not None and later.ref != first.ref:
        lost.append("reference")
    label = (later.preferred, later.dispreferred, later.delta)
    if first.preferred is None:
        first.preferred, first.dispreferred, first.delta = label
    elif later.preferred is not None and label != (first.preferred, first.dispreferred,
                                                   first.delta):
        lost.append("human label")
    for what in lost:
        drops.add(sid, pair, CONFLICTING_DUPLICATE,
                  f"{later.origin}: {what} differs from {first.origin}, which is kept")


def _row(sid: str, s: _Source) -> dict:
    return {
        "source_id": sid,
        "lang_pair": lang_pair(s.src_lang, s.tgt_lang),
        "src_lang": s.src_lang,
        "tgt_lang": s.tgt_lang,
        "src": s.src,
        "ref": s.ref,
        "systems": [{"system": k, "text": v} for k, v in s.systems.items()],
        "human_preferred": s.preferred,
        "human_dispreferred": s.dispreferred,
        "human_delta": s.delta,
        "duplicates": s.duplicates,
        "origin": s.origin,
    }


def _carried(source: _Source) -> list[dict]:
    """The source's carried scores, one per (text, scorer): the first occurrence's value."""
    return list({(s["text"], s["scorer"]): s for s in reversed(source.scores)}.values())[::-1]


@dataclass
class Part:
    """Up to one shard's worth of consecutive sources, with their carried scores and the drops
    of their empty provided outputs."""

    table: pa.Table
    scores: pa.Table
    dropped: pa.Table


@dataclass
class Scan:
    """What a first read of the source files learned, holding nothing per row but an 8-byte
    digest: the report's counts, the systems and references present, and which sources
    repeat. Every row is checked in it, so bad input fails before anything is written."""

    configs: list[SourcesConfig]
    report: SourcesReport
    ids: np.ndarray
    """The distinct sources' digests (`id_digest`), sorted: for set arithmetic with 8 bytes a
    source instead of a string."""
    repeated: set[int]
    """Digests that occur more than once: their sources merge before any is handed on."""
    systems: set[str] = field(default_factory=set)
    """Every provided system some source has an output of."""
    has_reference: bool = False


def id_digest(sid: str) -> int:
    """A 64-bit digest of a source id (any string: published data may carry ids of its own).
    Two ids sharing one (about 3e-8 odds among a million sources) only make a source count as
    repeated, which the merge step (by the whole id) settles; counts of new and kept sources
    could be off by such a pair."""
    return int.from_bytes(hashlib.blake2b(sid.encode(), digest_size=8).digest(), "big")


def _made(configs: Sequence[SourcesConfig]) -> Iterator[tuple[str, _Source]]:
    """Every source the files make, with its id, in file order (an ALMA-R row makes up to two)."""
    for config in configs:
        for number, row in read_rows(config):
            reader = _RowReader(config.path, number, row)
            if config.format == "alma_r":
                made = _alma_r_sources(config, reader)
            else:
                made = [_mapped_source(config, reader)]
            for source in made:
                yield source_id(source.src_lang, source.tgt_lang, source.src), source


def scan_sources(configs: Sequence[SourcesConfig] | SourcesConfig) -> Scan:
    """Read the source files once, checking every row (the first pass of `load_sources`)."""
    configs = [configs] if isinstance(configs, SourcesConfig) else list(configs)
    report = SourcesReport(files=[c.path for c in configs])
    digests = array("Q")
    systems: set[str] = set()
    has_reference = False
    for sid, source in _made(configs):
        report.rows_read += 1
        report.empty_system_outputs += len(source.empty)  # as read, row by row
        digests.append(id_digest(sid))
        systems.update(source.systems)
        has_reference = has_reference or source.ref is not None
    ids, counts = np.unique(np.frombuffer(digests, dtype=np.uint64), return_counts=True)
    report.duplicates_collapsed = len(digests) - len(ids)  # merged, not lost: no drop
    return Scan(configs, report, ids, set(ids[counts > 1].tolist()), systems, has_reference)


def merge_repeated(scan: Scan) -> tuple[dict[str, _Source], pa.Table]:
    """The sources that repeat, each folded into its first occurrence (a second read that
    keeps only those), and the `conflicting_duplicate` drops. Empty when none repeats."""
    merged: dict[str, _Source] = {}
    drops = Drops()
    if scan.repeated:
        for sid, source in _made(scan.configs):
            if id_digest(sid) not in scan.repeated:
                continue
            first = merged.setdefault(sid, source)
            if first is not source:
                _merge(first, source, sid, drops)
    return merged, drops.table()


def read_parts(scan: Scan, merged: dict[str, _Source], size: int) -> Iterator[Part]:
    """The sources table in parts of `size` rows, in order of first occurrence: a last read,
    where a repeated source comes out merged at its first occurrence. Counts the report's
    sources and language pairs as it goes."""
    report = scan.report
    rows: list[dict] = []
    scores: list[dict] = []
    drops = Drops()

    def part() -> Part:
        return Part(pa.Table.from_pylist(rows, schema=schema.SOURCES),
                    pa.Table.from_pylist(scores, schema=schema.SCORES), drops.table())

    for sid, source in _made(scan.configs):
        if id_digest(sid) in scan.repeated:
            source = merged.pop(sid, None)
            if source is None:  # a later occurrence: already handed on, merged
                continue
        pair = lang_pair(source.src_lang, source.tgt_lang)
        for name, detail in source.empty:  # after merging: a duplicate may have filled one
            if name not in source.systems:
                drops.add(sid, pair, EMPTY_SYSTEM_OUTPUT, detail)
        rows.append(_row(sid, source))
        scores.extend(_carried(source))
        report.sources += 1
        report.per_lang_pair[pair] = report.per_lang_pair.get(pair, 0) + 1
        if len(rows) == size:
            yield part()
            rows, scores, drops = [], [], Drops()
    if rows or not report.sources:
        yield part()


def load_sources(configs: Sequence[SourcesConfig] | SourcesConfig) -> Sources:
    """Read one or more source files into one sources table; duplicates collapse across files.
    A build reads the same way in parts (`scan_sources`, `merge_repeated`, `read_parts`) and
    never holds the whole table."""
    scan = scan_sources(configs)
    merged, conflicts = merge_repeated(scan)
    parts = list(read_parts(scan, merged, size=1 << 62))
    return Sources(table=pa.concat_tables([p.table for p in parts]),
                   scores=pa.concat_tables([p.scores for p in parts]), report=scan.report,
                   dropped=pa.concat_tables([conflicts, *(p.dropped for p in parts)]))


def fingerprint(table: pa.Table) -> str:
    """A hash of which sources a table holds (their ids, in order): provenance for a build."""
    digest = hashlib.sha256()
    add_to_fingerprint(digest, table)
    return digest.hexdigest()


def add_to_fingerprint(digest: Any, table: pa.Table) -> None:
    """`fingerprint` part by part: the same hash for a table read in consecutive parts."""
    for sid in table.column("source_id").to_pylist():
        digest.update(sid.encode() + b"\n")
