"""One HTML page per published version: what to look at before training on it.

`render_report(manifest, triplets, dropped)` returns the page; `write_report(uri, version)`
reads a published version and writes it into the version's folder. Per language pair: score
distributions per system, the margin histogram with the noise threshold marked, how often each
system was chosen and rejected (ALMA-R's Table 2), drop and veto reasons, agreement with human
labels, and a sample of pairs side by side with their word differences highlighted.

Why matplotlib, rendered to static SVG inlined in the page: the page then holds no JavaScript at
all, so nothing can fail in a browser console, it needs no network (text is drawn as paths, no
font is fetched) and it opens the same in any browser, mail attachment or file viewer. Vega-Altair
and plotly draw in the browser and need their JavaScript inlined (megabytes, per page);
matplotlib is the most widely kept of the three and draws on the server. It is used through its
object API (`matplotlib.figure.Figure`, no pyplot), which needs no display and leaves the
caller's backend alone.
"""

from __future__ import annotations

import difflib
import html
import io
import re
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa

from cpo_data import schema, store
from cpo_data.guards import NAMES as GUARDS
from cpo_data.langs import LANGUAGES
from cpo_data.publishing import WrittenFiles

REPORT_NAME = "report.html"
REPORT_FILE = f"{store.ATTACHMENTS_DIR}/{REPORT_NAME}"
"""Where the page sits in a version's folder: with the files `publish_triplets(attachments=)`
writes, in a `__` folder that `datasets` and pyarrow do not read as data."""

SAMPLE_PAIRS = 5
CHOSEN_COLOUR, REJECTED_COLOUR, LINE_COLOUR = "#2b8a3e", "#c92a2a", "#1c7ed6"

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       color: #212529; margin: 0 auto; max-width: 1180px; padding: 0 24px 48px; }
h1 { margin: 24px 0 4px; } h2 { margin-top: 40px; border-bottom: 2px solid #dee2e6; }
h3 { margin: 24px 0 8px; } .muted { color: #6c757d; }
table { border-collapse: collapse; margin: 8px 0; }
th, td { border: 1px solid #dee2e6; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f1f3f5; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
.facts td:first-child { font-weight: 600; background: #f8f9fa; }
nav ul { columns: 3; } svg { max-width: 100%; height: auto; }
.pair { border: 1px solid #dee2e6; border-radius: 6px; margin: 12px 0; padding: 8px 12px; }
.pair .src { background: #f8f9fa; padding: 4px 8px; margin: 6px 0; }
.sides { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.sides > div { padding: 4px 8px; border-left: 4px solid; }
.chosen { border-color: #2b8a3e !important; } .rejected { border-color: #c92a2a !important; }
ins { background: #d3f9d8; text-decoration: none; }
del { background: #ffe3e3; text-decoration: none; }
"""


# ---- small helpers ----------------------------------------------------------------------------

def _e(value: Any) -> str:
    """Any value as HTML text: every text in the page goes through here."""
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"


BATCH_ROWS = 8192
"""Rows read at a time: the page is gathered batch by batch, so rendering it costs memory per
batch (plus a few numbers per pair), not per version."""

TRIPLET_FACTS = ["id", "lang_pair", "selected_by", "chosen_system", "rejected_system",
                 "chosen_score", "rejected_score", "chosen_scores", "rejected_scores", "margin"]
"""The triplet columns the page counts and draws; the texts are read for the sample only."""
DROPPED_FACTS = ["lang_pair", "reason", "detail"]


def _batches(data: Any, columns: list[str] | None = None,
             batch_rows: int = BATCH_ROWS) -> Iterator[pa.Table]:
    """`data` (an Arrow table, a DataFrame as `store.read_dropped` returns, or something with
    a `batches(columns, batch_rows)` method: a version's written files) in tables of at most
    `batch_rows` rows, with `columns` only."""
    if data is None:
        return
    if hasattr(data, "batches"):
        yield from data.batches(columns, batch_rows)
        return
    if not isinstance(data, pa.Table):
        data = pa.Table.from_pandas(data, preserve_index=False)  # NaN back to None
    if columns is not None:
        data = data.select(columns)
    for start in range(0, data.num_rows, batch_rows):
        yield data.slice(start, batch_rows)


@dataclass
class PairFacts:
    """What the page shows of one language pair, added up batch by batch."""

    triplets: int = 0
    by_method: Counter = field(default_factory=Counter)
    chosen: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    side_scores: dict[str, dict[str, array]] = field(default_factory=dict)
    """system -> side -> the ranking scores of its texts on that side."""
    score_sums: dict[tuple[str, str, str], list[float]] = field(default_factory=dict)
    """(system, scorer, side) -> [sum, count]."""
    margins: array = field(default_factory=lambda: array("d"))
    labelled: int = 0
    label_margins: list[int] = field(default_factory=lambda: [0, 0, 0])
    """Of the human-label pairs scored on both sides: compared, agree, ties."""
    dropped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    """reason -> the first dropped row's detail."""

    def add_triplet(self, row: dict) -> None:
        self.triplets += 1
        self.by_method[row["selected_by"]] += 1
        for side in ("chosen", "rejected"):
            systems = _systems(row[f"{side}_system"])
            (self.chosen if side == "chosen" else self.rejected).update(systems)
            score = row[f"{side}_score"]
            for system in systems:
                sides = self.side_scores.setdefault(system, {"chosen": array("d"),
                                                             "rejected": array("d")})
                if score is not None:
                    sides[side].append(score)
            for entry in row[f"{side}_scores"] or []:
                if entry["score"] is None:
                    continue
                for system in systems:
                    total = self.score_sums.setdefault((system, entry["scorer"], side), [0.0, 0])
                    total[0] += entry["score"]
                    total[1] += 1
        margin = row["margin"]
        if margin is not None:
            self.margins.append(margin)
        if row["selected_by"] == "human_label":
            self.labelled += 1
            if (row["chosen_score"] is not None and row["rejected_score"] is not None
                    and margin is not None):
                counts = self.label_margins
                counts[0] += 1
                counts[1] += margin > 0
                counts[2] += margin == 0

    def add_dropped(self, row: dict) -> None:
        self.dropped[row["reason"]] += 1
        if row.get("detail") and row["reason"] not in self.examples:
            self.examples[row["reason"]] = row["detail"][:240]


def gather(triplets: Any, dropped: Any, batch_rows: int = BATCH_ROWS) -> dict[str, PairFacts]:
    """Each language pair's facts, in one pass over each table."""
    facts: dict[str, PairFacts] = {}
    for batch in _batches(triplets, TRIPLET_FACTS, batch_rows):
        for row in batch.to_pylist():
            facts.setdefault(row["lang_pair"], PairFacts()).add_triplet(row)
    for batch in _batches(dropped, DROPPED_FACTS, batch_rows):
        for row in batch.to_pylist():
            facts.setdefault(row["lang_pair"], PairFacts()).add_dropped(row)
    return facts


def _table(header: list[str] | None, rows: list[list[Any]], numeric: set[int] = frozenset(),
           css: str = "") -> str:
    """An HTML table; cells are escaped, columns in `numeric` right-aligned."""
    head = ("<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr></thead>"
            if header else "")
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    table = f'<table class="{css}">' if css else "<table>"
    return f"{table}{head}<tbody>{body}</tbody></table>"


def _systems(name: str) -> list[str]:
    """`ref+gpt4`: a text several systems gave counts for each (README, "Selection")."""
    return [s for s in name.split("+") if s] or [name]


def _pair_title(pair: str) -> str:
    src, _, tgt = pair.partition("-")
    names = [LANGUAGES[c].name if c in LANGUAGES else c for c in (src, tgt)]
    return f"{pair} ({names[0]} → {names[1]})"


# ---- charts: matplotlib figures as inline SVG --------------------------------------------------

def _svg(figure, prefix: str) -> str:
    """The figure as an `<svg>` element for inlining. Its ids (glyphs, clip paths, the `gid`s
    set on artists) get `prefix`: several SVGs in one page must not share an id."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "path", "svg.hashsalt": "cpo-data"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]  # drop the XML declaration and doctype
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)  # RDF about the file
    text = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', text)
    text = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', text)
    return re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", text)


def _figure(width: float, height: float):
    """A figure with fixed margins, in inches: room for tick labels, an axis label and a panel
    title. Not matplotlib's constrained or tight layout, which measure every text and took
    twice as long as the drawing itself (0.9-1.3 s against 0.4-0.7 s per report)."""
    from matplotlib.figure import Figure  # the object API: no pyplot, no display, ~0.7 s import

    figure = Figure(figsize=(width, height), dpi=100)
    figure.subplots_adjust(left=0.6 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                           top=1 - 0.3 / height, wspace=0.3, hspace=0.6)
    return figure


def _bins(values: list[float], count: int = 30) -> list[float]:
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 0.5, high + 0.5
    return [low + (high - low) * i / count for i in range(count + 1)]


def score_chart(facts: PairFacts, rank_by: str, prefix: str) -> str:
    """Per system, histograms of the ranking score of its texts on the chosen side and on the
    rejected side; one panel per system, bins shared across panels."""
    by_system = facts.side_scores
    filled = [v for sides in by_system.values() for v in sides.values() if v]
    if not filled:
        return '<p class="muted">No pair of this language pair carries the ranking score.</p>'
    bins = _bins([min(min(v) for v in filled), max(max(v) for v in filled)])
    systems = sorted(by_system)
    columns = min(3, len(systems))
    lines = -(-len(systems) // columns)
    figure = _figure(3.8 * columns, 2.4 * lines)
    axes = figure.subplots(lines, columns, sharex=True, squeeze=False).ravel()
    for ax, system in zip(axes, systems, strict=False):
        sides = by_system[system]
        ax.hist(sides["chosen"], bins=bins, color=CHOSEN_COLOUR, alpha=0.6,
                label=f"chosen ({len(sides['chosen'])})")
        ax.hist(sides["rejected"], bins=bins, histtype="step", linewidth=1.5,
                color=REJECTED_COLOUR, label=f"rejected ({len(sides['rejected'])})")
        ax.margins(y=0.3)  # room for the legend above the bars
        ax.set_title(system, fontsize=10)
        ax.set_xlabel(rank_by)
        ax.legend(fontsize=8, frameon=False)
    for ax in axes[len(systems):]:
        ax.set_visible(False)
    return _svg(figure, prefix)


def margin_floor(manifest: dict) -> tuple[float | None, float | None, str]:
    """The margin a pair had to reach (provenance `min_margin`), the ranking score's noise
    threshold where it has one, and a sentence saying where the floor came from."""
    provenance = manifest.get("provenance") or {}
    rank_by = provenance.get("rank_by") or "the ranking score"
    floor = provenance.get("min_margin")
    noise = (provenance.get("noise_thresholds") or {}).get(rank_by)
    configured = ((provenance.get("config") or {}).get("select") or {}).get("min_margin")
    if floor is None:
        return None, noise, "This version's manifest does not say which margin pairs needed."
    if configured is not None:
        origin = f"select.min_margin: {configured:g}"
        if noise is not None and noise != floor:
            origin += f", overriding the noise threshold of {rank_by} ({noise:g})"
    elif noise is not None:
        origin = f"the noise threshold of {rank_by}"
    else:
        origin = f"{rank_by} has no noise threshold, so only a strict order was asked"
    return floor, noise, f"Pairs needed a margin of at least {floor:g} ({origin})."


def margin_chart(margins: Sequence[float], floor: float | None, noise: float | None,
                 rank_by: str, prefix: str) -> str:
    """Histogram of the pairs' margins, with the floor they had to reach as a vertical line
    (gid `noise-threshold`), and the noise threshold (dashed) where a set floor overrides it."""
    if not margins:
        return '<p class="muted">No pair of this language pair has a margin.</p>'
    figure = _figure(7.5, 2.8)
    ax = figure.subplots()
    ax.hist(margins, bins=_bins(margins), color="#868e96", label=f"pairs ({len(margins)})")
    if floor is not None:
        line = ax.axvline(floor, color=LINE_COLOUR, linewidth=2,
                          label=f"floor {floor:g}" + (" (noise threshold)" if noise == floor
                                                      else ""))
        line.set_gid("noise-threshold")
    if noise is not None and noise != floor:
        line = ax.axvline(noise, color=LINE_COLOUR, linestyle="--", linewidth=1.5,
                          label=f"noise threshold {noise:g}")
        line.set_gid("noise-threshold-published")
    ax.margins(y=0.3)
    ax.set_xlabel(f"margin ({rank_by}, chosen − rejected)")
    ax.set_ylabel("pairs")
    ax.legend(fontsize=8, frameon=False)
    return _svg(figure, prefix)


# ---- tables -------------------------------------------------------------------------------

def systems_table(facts: PairFacts) -> str:
    """How often each system is chosen and rejected, per pair (ALMA-R's Table 2)."""
    chosen, rejected, pairs = facts.chosen, facts.rejected, facts.triplets
    systems = sorted(chosen.keys() | rejected.keys(), key=lambda s: (-chosen[s], s))
    return _table(
        ["system", "chosen", "chosen, % of pairs", "rejected", "rejected, % of pairs"],
        [[s, chosen[s], _pct(chosen[s], pairs), rejected[s], _pct(rejected[s], pairs)]
         for s in systems], numeric={1, 2, 3, 4})


def scorer_means_table(facts: PairFacts) -> str:
    """Per system and scorer, the mean score of its texts on each side."""
    sums = facts.score_sums
    scorers = sorted({scorer for _, scorer, _ in sums})
    systems = sorted({system for system, _, _ in sums})
    if not scorers:
        return ""

    def mean(key: tuple[str, str, str]) -> str:
        total = sums.get(key)
        return _num(total[0] / total[1]) if total else "–"

    header = ["system"] + [f"{scorer}, {side}" for scorer in scorers
                           for side in ("chosen", "rejected")]
    body = [[system] + [mean((system, scorer, side)) for scorer in scorers
                        for side in ("chosen", "rejected")] for system in systems]
    return ("<p>Mean score per scorer of each system's texts, on each side:</p>"
            + _table(header, body, numeric=set(range(1, len(header)))))


def drops_table(facts: PairFacts) -> str:
    """Dropped rows per reason, guards' vetoes marked, with one example detail each."""
    if not facts.dropped:
        return '<p class="muted">Nothing of this language pair was dropped.</p>'
    counts, example = facts.dropped, facts.examples
    rows = [[reason, "guard veto" if reason in GUARDS else "drop", count,
             example.get(reason, "")] for reason, count in counts.most_common()]
    return _table(["reason", "kind", "rows", "example detail"], rows, numeric={2})


def guards_table(manifest: dict, facts: dict[str, PairFacts]) -> str:
    """Each guard: on or off, the candidates it vetoed out of those checked, per pair too."""
    provenance = manifest.get("provenance") or {}
    vetoes = provenance.get("vetoes") or {}
    guarded = provenance.get("guarded")
    config = (provenance.get("config") or {}).get("guards") or {}
    pairs = sorted(p for p, f in facts.items() if any(f.dropped[g] for g in GUARDS))
    per_pair = Counter({(reason, p): n for p, f in facts.items()
                        for reason, n in f.dropped.items()})
    rows = []
    for guard in GUARDS:
        setting = config.get(guard)
        enabled = "unknown" if not isinstance(setting, dict) else (
            "on" if setting.get("enabled", True) else "off")
        count = vetoes.get(guard, sum(per_pair[(guard, p)] for p in pairs))
        share = f"{count} of {guarded} ({_pct(count, guarded)})" if guarded else str(count)
        rows.append([guard, enabled, share] + [per_pair[(guard, p)] for p in pairs])
    checked = (f"The guards checked {guarded} candidates (every one but the reference's)."
               if guarded is not None else "This version's manifest does not say how many "
               "candidates the guards checked.")
    return (f"<p>{_e(checked)}</p>"
            + _table(["guard", "enabled", "vetoed"] + pairs, rows,
                     numeric=set(range(2, 3 + len(pairs)))))


def label_agreement(facts: PairFacts, rank_by: str) -> str:
    """Of the pairs a human label chose that carry the ranking score on both sides: how often
    the score agrees with the label (margin > 0), ties, or disagrees."""
    if not facts.labelled:
        return ('<p class="muted">No pair of this language pair was chosen by a human label '
                "(none carries one, or <code>select.use_human_labels</code> is off). Where "
                "the sources carry labels that were not used, the overview says how often the "
                "ranking score agreed with them across the build (versions built before "
                "cpo-data kept that in the manifest do not say).</p>")
    compared, agree, ties = facts.label_margins
    return (f"<p>{facts.labelled} pairs were chosen by a human label; {compared} carry "
            f"{_e(rank_by)} on both sides. Of those, the score agrees with the label in "
            f"<b>{agree} of {compared}</b> ({_pct(agree, compared)}), ties in {ties} "
            f"and disagrees in {compared - agree - ties}.</p>")


# ---- sample pairs ---------------------------------------------------------------------------

_TOKEN = re.compile(r"\s+|[\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff]|\w+|[^\w\s]")
"""Words, punctuation and spacing; CJK characters one by one (no spaces between words)."""


def highlight(chosen: str, rejected: str) -> tuple[str, str]:
    """Both texts as HTML: words only the chosen side has in `<ins>`, words only the rejected
    side has in `<del>` (difflib over words)."""
    a, b = _TOKEN.findall(rejected), _TOKEN.findall(chosen)
    kept_a, kept_b = [], []
    for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        old, new = _e("".join(a[i1:i2])), _e("".join(b[j1:j2]))
        if op == "equal":
            kept_a.append(old)
            kept_b.append(new)
            continue
        if old:
            kept_a.append(f"<del>{old}</del>")
        if new:
            kept_b.append(f"<ins>{new}</ins>")
    return "".join(kept_b), "".join(kept_a)


def sample(rows: list[dict], count: int = SAMPLE_PAIRS) -> list[dict]:
    """`count` pairs spread over the margins: the smallest, the largest and evenly between,
    deterministic (ties broken by id). Pairs without a margin (a human label over unscored
    texts) fill up only where fewer pairs have one."""
    scored = sorted((r for r in rows if r["margin"] is not None),
                    key=lambda r: (r["margin"], r["id"]))
    if len(scored) <= count:
        unscored = sorted((r for r in rows if r["margin"] is None), key=lambda r: r["id"])
        return scored + unscored[:count - len(scored)]
    picks = sorted({round(i * (len(scored) - 1) / (count - 1)) for i in range(count)})
    return [scored[i] for i in picks]


def _pick_ranks(ordered: Any, count: int) -> list[tuple[float, int]]:
    """`sample`'s picks in `ordered` (a pair's margins, sorted), each as its margin and its
    place among that margin's rows in id order."""
    import numpy as np

    picks = []
    for rank in sorted({round(i * (len(ordered) - 1) / (count - 1)) for i in range(count)}):
        margin = float(ordered[rank])
        picks.append((margin, rank - int(np.searchsorted(ordered, margin, side="left"))))
    return picks


def _pick(ordered: Any, count: int, ties: dict[float, list[dict]]) -> list[dict]:
    """`sample`'s picks by rank in `ordered`, from the rows kept for the margins the picks land
    on (`ties`, each margin's rows with the smallest ids)."""
    return [sorted(ties[margin], key=lambda r: r["id"])[place]
            for margin, place in _pick_ranks(ordered, count)]


def samples(triplets: Any, facts: dict[str, PairFacts], count: int = SAMPLE_PAIRS,
            batch_rows: int = BATCH_ROWS) -> dict[str, list[dict]]:
    """`sample` of each pair's triplets, in a second pass that keeps only the rows a pick can
    land on: those with a margin a pick's rank has (with their ties), and, for a pair with at
    most `count` margins, every row with one and the first unscored rows by id."""
    import numpy as np
    import pyarrow.compute as pc

    ordered = {p: np.sort(np.frombuffer(f.margins, dtype=np.float64)) if f.margins
               else np.empty(0) for p, f in facts.items()}
    # margin -> how many of its rows (the smallest ids) a pick can reach: a margin that many
    # pairs share (chrF's 100, or one text scored the same in every cycle) keeps only those
    targets: dict[str, dict[float, int]] = {}
    for p, m in ordered.items():
        if len(m) > count:
            for margin, place in _pick_ranks(m, count):
                reach = targets.setdefault(p, {})
                reach[margin] = max(reach.get(margin, 0), place + 1)
    few = {p for p, m in ordered.items() if len(m) <= count and facts[p].triplets}
    wanted = pa.array(sorted({m for values in targets.values() for m in values}), pa.float64())
    kept: dict[str, list[dict]] = {p: [] for p in few}
    ties: dict[str, dict[float, list[dict]]] = {p: {} for p in targets}
    for batch in _batches(triplets, None, batch_rows):
        margin = batch.column("margin")
        mask = pc.is_in(margin, value_set=wanted)
        if few:  # a `few` pair's rows are all looked at, and only the first ids kept
            mask = pc.or_(mask, pc.is_in(batch.column("lang_pair"),
                                         value_set=pa.array(sorted(few), pa.string())))
        for row in batch.filter(pc.fill_null(mask, False)).to_pylist():
            pair = row["lang_pair"]
            if pair in kept:
                kept[pair].append(row)
                scored = [r for r in kept[pair] if r["margin"] is not None]
                unscored = sorted((r for r in kept[pair] if r["margin"] is None),
                                  key=lambda r: r["id"])
                kept[pair] = scored + unscored[:count]  # only the first ids can be picked
            elif pair in ties and row["margin"] in targets[pair]:
                reach = targets[pair][row["margin"]]
                rows = ties[pair].setdefault(row["margin"], [])
                rows.append(row)
                if len(rows) >= 2 * reach + BATCH_ROWS // 64:  # trimmed now and then, not per row
                    rows.sort(key=lambda r: r["id"])
                    del rows[reach:]
    found = {p: sample(rows, count) for p, rows in kept.items()}
    found.update({p: _pick(ordered[p], count, ties[p]) for p in targets})
    return found


def sample_pairs(picked: list[dict]) -> str:
    """The sampled pairs side by side (`samples`)."""
    blocks = []
    for row in picked:
        chosen, rejected = highlight(row["chosen"], row["rejected"])
        blocks.append(
            '<div class="pair">'
            f'<div class="muted">margin {_num(row["margin"])}, confidence '
            f'{_num(row["confidence"], 3)}, selected by {_e(row["selected_by"])}, '
            f'id {_e(row["id"])}</div>'
            f'<div class="src">{_e(row["src"])}</div><div class="sides">'
            f'<div class="chosen"><b>chosen</b>: {_e(row["chosen_system"])} '
            f'({_num(row["chosen_score"])})<br>{chosen}</div>'
            f'<div class="rejected"><b>rejected</b>: {_e(row["rejected_system"])} '
            f'({_num(row["rejected_score"])})<br>{rejected}</div></div></div>')
    return "".join(blocks)


# ---- the page ------------------------------------------------------------------------------

def _overview(manifest: dict, pairs: dict[str, PairFacts], floor_text: str) -> str:
    provenance = manifest.get("provenance") or {}
    per_pair = manifest.get("rows_per_lang_pair") or {p: f.triplets for p, f in pairs.items()
                                                      if f.triplets}
    by_method = sum((f.by_method for f in pairs.values()), Counter())
    all_dropped = sum((f.dropped for f in pairs.values()), Counter())
    facts = [
        ["dataset", manifest.get("name", "unknown")],
        ["version", manifest.get("version", "unknown")],
        ["created", manifest.get("created_at", "unknown")],
        ["triplets", manifest.get("rows", sum(f.triplets for f in pairs.values()))],
        ["dropped rows", manifest.get("dropped_rows", all_dropped.total())],
        ["ranked by", provenance.get("rank_by", "unknown")],
        ["margin floor", floor_text],
        ["selected by", ", ".join(f"{k}: {v}" for k, v in sorted(by_method.items()))],
    ]
    ingestion = provenance.get("ingestion")
    if ingestion:
        facts.append(["ingestion", ", ".join(f"{k}: {v}" for k, v in ingestion.items())])
    counts = _table(["language pair", "triplets", "dropped rows"],
                    [[p, n, pairs[p].dropped.total() if p in pairs else 0]
                     for p, n in sorted(per_pair.items())], numeric={1, 2})
    reasons = manifest.get("dropped_per_reason") or dict(all_dropped)
    reasons_html = (_table(["reason", "rows"], sorted(reasons.items(), key=lambda kv: -kv[1]),
                           numeric={1}) if reasons
                    else '<p class="muted">Nothing was dropped.</p>')
    agreement = manifest.get("agreement") or provenance.get("agreement")
    agreement_html = ""
    if isinstance(agreement, dict) and agreement.get("compared"):
        agreement_html = (
            f"<p>Across the build, the ranking score agreed with the human labels on "
            f"{_e(agreement.get('agree'))} of {_e(agreement.get('compared'))} labelled sources "
            f"({_pct(agreement.get('agree', 0), agreement['compared'])}).</p>")
    return ('<section id="overview"><h2>Overview</h2>'
            + _table(None, facts, css="facts")
            + "<h3>Language pairs</h3>" + counts
            + "<h3>Drop reasons</h3>" + reasons_html
            + '<h3 id="guards">Guards</h3>' + guards_table(manifest, pairs)
            + agreement_html + "</section>")


def _pair_section(pair: str, facts: PairFacts, picked: list[dict], rank_by: str,
                  floor: float | None, noise: float | None, floor_text: str, index: int) -> str:
    return (
        f'<section id="{_e(pair)}"><h2>{_e(_pair_title(pair))}</h2>'
        f"<p>{facts.triplets} triplets ("
        + ", ".join(f"{_e(k)}: {v}" for k, v in sorted(facts.by_method.items()))
        + f"), {facts.dropped.total()} dropped rows.</p>"
        f'<h3 id="{_e(pair)}-scores">Score distributions per system</h3>'
        f"<p>The ranking score, {_e(rank_by)}, of each system's texts as the chosen side "
        "(filled) and as the rejected side (outline).</p>"
        + score_chart(facts, rank_by, f"s{index}") + scorer_means_table(facts)
        + f'<h3 id="{_e(pair)}-margins">Margins</h3><p>{_e(floor_text)}</p>'
        + margin_chart(facts.margins, floor, noise, rank_by, f"m{index}")
        + f'<h3 id="{_e(pair)}-systems">Systems chosen and rejected</h3>'
        + systems_table(facts)
        + f'<h3 id="{_e(pair)}-dropped">Dropped and vetoed</h3>' + drops_table(facts)
        + f'<h3 id="{_e(pair)}-labels">Agreement with human labels</h3>'
        + label_agreement(facts, rank_by)
        + f'<h3 id="{_e(pair)}-sample">Sample pairs</h3><p class="muted">The smallest and the '
        "largest margin and evenly between; words only one side has are highlighted.</p>"
        + sample_pairs(picked) + "</section>")


def render_report(manifest: dict, triplets: Any, dropped: Any,
                  batch_rows: int = BATCH_ROWS) -> str:
    """The report on one version as a complete HTML document: inline CSS and SVG, no script,
    nothing fetched. Keys missing from an older version's manifest are said to be missing.
    `triplets` and `dropped` as `_batches` takes them; each is read `batch_rows` at a time
    (the triplets twice: the facts, then the sample), never whole."""
    facts = gather(triplets, dropped, batch_rows)
    picked = samples(triplets, facts, batch_rows=batch_rows)
    provenance = manifest.get("provenance") or {}
    rank_by = provenance.get("rank_by") or "the ranking score"
    floor, noise, floor_text = margin_floor(manifest)
    pairs = sorted(facts)
    title = f"{manifest.get('name', 'dataset')} {manifest.get('version', '')}".strip()
    contents = "".join(f'<li><a href="#{_e(p)}">{_e(_pair_title(p))}</a></li>' for p in pairs)
    sections = "".join(
        _pair_section(pair, facts[pair], picked.get(pair, []), rank_by, floor, noise,
                      floor_text, index)
        for index, pair in enumerate(pairs))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}: cpo-data report</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1><p class=\"muted\">Preference triplets, one version of a "
        "cpo-data dataset: what was kept, what was left out and why.</p>"
        '<nav><b>Contents</b><ul><li><a href="#overview">Overview</a></li>'
        f'<li><a href="#guards">Guards</a></li>{contents}</ul></nav>'
        + _overview(manifest, facts, floor_text) + sections
        + "</body></html>\n")


def attachment(manifest: dict, triplets: pa.Table, dropped: pa.Table) -> dict[str, bytes]:
    """The report as an attachment, for `store.publish_triplets(..., attachments=attachment)`:
    written with the version and listed, with its sha256, in its manifest."""
    return {REPORT_NAME: render_report(manifest, triplets, dropped).encode("utf-8")}


def published_report(manifest: dict) -> str | None:
    """The report's path inside the version folder when it was published with the version
    (listed in its manifest); None otherwise."""
    listed = any(e["path"] == REPORT_FILE for e in manifest.get("attachments") or [])
    return REPORT_FILE if listed else None


def write_report(uri: str, version: str = "latest", *, name: str | None = None) -> str:
    """Render the report of a published version and write it into the version's folder
    (`REPORT_FILE`, where `attachment` puts it at publishing); return its URI. For versions
    published without it: the manifest, written once, does not list the file. `uri` and
    `name` as for `store.read_triplets`."""
    manifest = store.read_manifest(uri, version, name=name)
    version = manifest["version"]
    # The version's files in batches, checked first, so a large version is never read whole.
    files = {key: WrittenFiles(*store.checked_files(uri, version, key, name=name), table)
             for key, table in (("files", schema.TRIPLETS), ("dropped_files", schema.DROPPED))}
    page = render_report(manifest, files["files"], files["dropped_files"])
    target = f"{store.version_path(uri, version, name=name)}/{REPORT_FILE}"
    with fsspec.open(target, "wb", auto_mkdir=True) as file:
        file.write(page.encode("utf-8"))
    return target
