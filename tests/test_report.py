"""The per-version report: its contents (fast, on small tables) and the page in a real browser.

The browser tests drive headless Chromium over the DevTools protocol on a pipe
(`--remote-debugging-pipe`): console messages, uncaught exceptions and failed loads (a missing
image) arrive as events there. Chromium's `--enable-logging=stderr` was tried first: it prints
console calls, but not resources that fail to load, so it would pass a page with a broken image.
"""

from __future__ import annotations

import base64
import json
import os
import re
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pytest

from cpo_data import report, schema, store
from cpo_data.testing import sample_dropped, sample_triplets

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# matplotlib 3.9 calls pyparsing names that pyparsing 3.3 deprecates; not this project's code.
pytestmark = pytest.mark.filterwarnings("ignore:'\\w+' deprecated - use:DeprecationWarning")

INSTALL = ("headless Chromium is needed for the report's browser tests: `apt-get install -y "
           "--no-install-recommends chromium` (Debian), which `./run test` does when it may; set "
           "CPO_DATA_ALLOW_NO_BROWSER=1 to skip these tests instead")


# ---- a small DevTools-protocol client ------------------------------------------------------

class Chromium:
    """Headless Chromium driven over `--remote-debugging-pipe` (fd 3 in, fd 4 out, messages
    ending in NUL), keeping every event it sends."""

    def __init__(self, binary: str, profile: str, timeout: float = 60.0):
        self.timeout, self.events, self._next, self._buffer = timeout, [], 0, b""
        commands_in, self._commands = os.pipe()
        self._replies, replies_out = os.pipe()
        self._log = open(Path(profile) / "chromium.log", "wb")  # noqa: SIM115 (closed in close)
        args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
                "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
                "about:blank"]
        # bash puts the pipe ends on fds 3 and 4, where Chromium looks for them.
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{commands_in} 4>&{replies_out}', "bash", *args],
            pass_fds=(commands_in, replies_out), stdin=subprocess.DEVNULL,
            stdout=self._log, stderr=self._log)
        os.close(commands_in)
        os.close(replies_out)

    def send(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        reply = self.wait(lambda m: m.get("id") == self._next)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait(self, matches) -> dict:
        """The next message that `matches`; events met on the way are kept."""
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if matches(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                raise TimeoutError(f"Chromium sent nothing for {self.timeout:.0f} s")
            chunk = os.read(self._replies, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe (crashed or exited)")
            self._buffer += chunk

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for fd in (self._commands, self._replies):
            os.close(fd)
        self._log.close()


def problems(events: list[dict]) -> list[str]:
    """Console errors and warnings, uncaught exceptions and failed loads, in words."""
    found = []
    for event in events:
        method, params = event["method"], event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params["type"] in ("error", "warning",
                                                                        "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            found.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append("uncaught: " + details.get("exception", {}).get("description",
                                                                       details.get("text", "")))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            found.append(f"{entry['source']} {entry['level']}: {entry['text']} "
                         f"{entry.get('url', '')}".strip())
    return found


def open_page(binary: str, path: Path, screenshot: Path, width: int = 1280,
              height: int = 2000, full_page: bool = False) -> dict:
    """Load `path` in headless Chromium; save a screenshot of its top `width` x `height` (the
    whole page with `full_page`); return what went wrong and what the page holds."""
    with tempfile.TemporaryDirectory(prefix="cpo-data-chromium-") as profile:
        browser = Chromium(binary, profile)
        try:
            target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = browser.send("Target.attachToTarget",
                                   {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                browser.send(f"{domain}.enable", session=session)
            browser.send("Emulation.setDeviceMetricsOverride",
                         {"width": width, "height": height, "deviceScaleFactor": 1,
                          "mobile": False}, session=session)
            navigated = browser.send("Page.navigate", {"url": path.resolve().as_uri()},
                                     session=session)
            if navigated.get("errorText"):
                raise RuntimeError(f"{path}: {navigated['errorText']}")
            browser.wait(lambda m: m.get("method") == "Page.loadEventFired")
            # Two frames after load: painted, and late console messages delivered.
            browser.send("Runtime.evaluate", {
                "expression": "new Promise(r => requestAnimationFrame(() => "
                              "requestAnimationFrame(r)))", "awaitPromise": True},
                session=session)
            page = json.loads(browser.send("Runtime.evaluate", {
                "expression": "JSON.stringify({text: document.body ? document.body.innerText"
                              ".length : 0, svgs: document.querySelectorAll('svg').length, "
                              "sections: document.querySelectorAll('section').length, "
                              "height: document.documentElement.scrollHeight, "
                              "title: document.title})", "returnByValue": True},
                session=session)["result"]["value"])
            capture: dict = {"format": "png"}
            if full_page:
                capture |= {"captureBeyondViewport": True, "clip": {
                    "x": 0, "y": 0, "width": width, "height": page["height"], "scale": 1}}
            shot = browser.send("Page.captureScreenshot", capture, session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.close()
    return {**page, "problems": problems(browser.events)}


def blank(screenshot: Path, min_share: float = 0.01) -> str | None:
    """Why the screenshot looks blank (one colour, or under `min_share` of its pixels away
    from the background colour), or None."""
    from PIL import Image

    with Image.open(screenshot) as image:
        histogram = image.convert("L").histogram()
    background = max(range(256), key=histogram.__getitem__)
    drawn = sum(n for level, n in enumerate(histogram) if abs(level - background) > 16)
    share = drawn / sum(histogram)
    if share < min_share:
        return f"{share:.2%} of the pixels differ from the background (grey {background})"
    return None


@pytest.fixture(scope="session")
def chromium() -> str:
    for name in BROWSERS:
        if found := shutil.which(name):
            return found
    if os.environ.get("CPO_DATA_ALLOW_NO_BROWSER") == "1":
        pytest.skip("no Chromium on PATH, and CPO_DATA_ALLOW_NO_BROWSER=1 says that is fine "
                    "(install: apt-get install -y --no-install-recommends chromium)")
    pytest.fail("no chromium, chromium-browser or google-chrome on PATH; " + INSTALL)


# ---- the report's contents (fast: small tables) -------------------------------------------

NASTY = "<script>alert('x')</script> Tom & Jerry"


def labelled_table() -> pa.Table:
    """sample_triplets with systems that differ per row, a joint system, a nasty text, and
    two human-labelled pairs of en-de (one agrees with the score, one does not)."""
    rows = sample_triplets(rows_per_pair=6).to_pylist()
    for i, row in enumerate(rows):
        if i % 3 == 1:
            row["chosen_system"], row["rejected_system"] = "system_b", "system_a"
    rows[0]["chosen"] = "The train leaves at eight today " + NASTY
    rows[0]["rejected"] = "The train departs at eight today " + NASTY
    rows[0]["chosen_system"] = "ref+system_a"
    rows[5]["src"] = "Quelle <b>bold</b> & mehr"  # the smallest margin: always sampled
    for row, margin in zip(rows[6:8], (0.2, -0.1), strict=True):
        row["selected_by"] = "human_label"
        row["rejected_score"] = row["chosen_score"] - margin
        row["margin"] = margin
    return pa.Table.from_pylist(rows, schema=schema.TRIPLETS)


def labelled_dropped(table: pa.Table) -> pa.Table:
    ids = table.column("source_id").to_pylist()
    rows = [*sample_dropped(ids[:2], "tied_scores").to_pylist(),
            {"source_id": ids[6], "lang_pair": "en-de", "reason": "off_target",
             "detail": "system_b: <img src=x onerror=alert(1)> reads as German"},
            {"source_id": ids[7], "lang_pair": "en-de", "reason": "off_target", "detail": None},
            {"source_id": ids[8], "lang_pair": "en-de", "reason": "repetition", "detail": None}]
    return pa.Table.from_pylist(rows, schema=schema.DROPPED)


def manifest(**provenance) -> dict:
    return {"name": "demo", "version": "20260101-000000-abcdef", "rows": 12,
            "created_at": "2026-01-01T00:00:00+00:00",
            "rows_per_lang_pair": {"de-en": 6, "en-de": 6}, "dropped_rows": 5,
            "dropped_per_reason": {"tied_scores": 2, "off_target": 2, "repetition": 1},
            "provenance": {"rank_by": "chrf", "min_margin": 0.05,
                           "noise_thresholds": {"chrf": 0.05}, "guarded": 40,
                           "vetoes": {"off_target": 2, "repetition": 1},
                           "config": {"select": {"min_margin": None},
                                      "guards": {"off_target": {"enabled": True},
                                                 "copy_of_source": {"enabled": False}}},
                           **provenance}}


@pytest.fixture(scope="module")
def page() -> str:
    table = labelled_table()
    return report.render_report(manifest(), table, labelled_dropped(table))


def section(page: str, pair: str, part: str) -> str:
    """The HTML from a pair's `part` heading to the next heading."""
    start = page.index(f'id="{pair}-{part}"')
    end = page.find("<h3", start)
    return page[start:end if end > 0 else None]


def test_every_text_is_escaped(page):
    assert "<script" not in page and "<img" not in page and "<b>bold" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; Tom &amp; Jerry" in page
    assert "Quelle &lt;b&gt;bold&lt;/b&gt; &amp; mehr" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page  # a dropped row's detail


def test_the_page_needs_nothing_from_outside(page):
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"<(script|link|img|iframe|object|embed)\b", page)
    assert "@import" not in page and "@font-face" not in page
    assert set(re.findall(r"url\(([^)]*)\)", page)) <= {
        u for u in re.findall(r"url\((#[^)]*)\)", page)}
    links = re.findall(r'(?:href|src)="([^"]*)"', page)
    assert links and all(link.startswith("#") for link in links), links
    # Namespaces name, they do not load; nothing else may start with a scheme.
    assert set(re.findall(r"https?://[^\s\"'<>]+", page)) <= {
        "http://www.w3.org/2000/svg", "http://www.w3.org/1999/xlink"}


def test_ids_are_unique_and_every_link_lands(page):
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), [i for i in set(ids) if ids.count(i) > 1][:5]
    for link in set(re.findall(r'href="#([^"]+)"', page)):
        assert link in ids, link


def test_each_pair_has_every_section_and_an_entry_in_the_contents(page):
    for pair in ("de-en", "en-de"):
        assert f'<a href="#{pair}">' in page
        for part in ("scores", "margins", "systems", "dropped", "labels", "sample"):
            assert section(page, pair, part)
        assert section(page, pair, "scores").count("<svg") == 1
        assert section(page, pair, "margins").count("<svg") == 1
    assert "de-en (German → English)" in page


def test_margin_histogram_marks_the_noise_threshold(page):
    margins = section(page, "de-en", "margins")
    assert re.search(r'<g id="m0-noise-threshold">\s*<path', margins)
    assert "at least 0.05 (the noise threshold of chrf)" in margins
    assert "noise-threshold-published" not in margins  # floor and threshold are one line


def test_a_set_min_margin_shows_both_lines():
    data = manifest()
    data["provenance"] |= {"min_margin": 0.0, "noise_thresholds": {"chrf": 0.0124}}
    data["provenance"]["config"]["select"]["min_margin"] = 0.0
    floor, noise, text = report.margin_floor(data)
    assert (floor, noise) == (0.0, 0.0124)
    assert text == ("Pairs needed a margin of at least 0 (select.min_margin: 0, overriding the "
                    "noise threshold of chrf (0.0124)).")
    margins = sample_triplets(rows_per_pair=3).column("margin").to_pylist()
    chart = report.margin_chart(margins, floor, noise, "chrf", "x")
    assert 'id="x-noise-threshold"' in chart and 'id="x-noise-threshold-published"' in chart


def test_systems_table_counts_each_side_per_pair(page):
    table = section(page, "de-en", "systems")
    # de-en rows 0..5: row 0 ref+system_a over system_b, rows 1 and 4 system_b over system_a.
    assert ('<tr><td>system_a</td><td class="n">4</td><td class="n">66.7%</td>'
            '<td class="n">2</td><td class="n">33.3%</td></tr>') in table
    assert ('<tr><td>ref</td><td class="n">1</td><td class="n">16.7%</td>'
            '<td class="n">0</td><td class="n">0.0%</td></tr>') in table
    assert ('<tr><td>system_b</td><td class="n">2</td><td class="n">33.3%</td>'
            '<td class="n">4</td><td class="n">66.7%</td></tr>') in table


def test_drops_and_guards_are_counted(page):
    assert ('<tr><td>off_target</td><td>guard veto</td><td class="n">2</td>'
            "<td>system_b: &lt;img") in section(page, "en-de", "dropped")
    assert ('<tr><td>tied_scores</td><td>drop</td><td class="n">2</td>'
            in section(page, "de-en", "dropped"))
    guards = page[page.index('id="guards"'):page.index("</section>")]
    assert "The guards checked 40 candidates" in guards
    assert ('<tr><td>off_target</td><td>on</td><td class="n">2 of 40 (5.0%)</td>'
            '<td class="n">2</td></tr>') in guards
    assert '<tr><td>copy_of_source</td><td>off</td><td class="n">0 of 40 (0.0%)</td>' in guards
    assert '<tr><td>length_ratio</td><td>unknown</td>' in guards


def test_agreement_with_human_labels(page):
    assert ("2 pairs were chosen by a human label; 2 carry chrf on both sides. Of those, the "
            "score agrees with the label in <b>1 of 2</b> (50.0%), ties in 0 and disagrees in 1"
            ) in section(page, "en-de", "labels")
    assert "No pair of this language pair was chosen by a human label" in section(
        page, "de-en", "labels")


def test_sample_spans_the_margins_and_highlights_differences():
    rows = [{"id": f"{i:02d}", "margin": m} for i, m in enumerate([0.5, None, 0.1, 0.9, 0.3,
                                                                     0.2, 0.7, 0.4])]
    picked = [r["id"] for r in report.sample(rows, 5)]
    assert picked == ["02", "04", "07", "00", "03"]  # 0.1 ... 0.9 evenly; no margin left out
    assert report.sample(rows, 5) == report.sample(list(reversed(rows)), 5)
    chosen, rejected = report.highlight("The train leaves at eight.", "The train departs at 8.")
    assert chosen == "The train <ins>leaves</ins> at <ins>eight</ins>."
    assert rejected == "The train <del>departs</del> at <del>8</del>."
    chosen, rejected = report.highlight("我爱猫 & 狗", "我爱狗")
    assert chosen == "我爱<ins>猫 &amp; </ins>狗" and rejected == "我爱狗"


def test_sample_pairs_show_both_sides(page):
    sample = section(page, "de-en", "sample")
    assert sample.count('<div class="pair">') == 5
    assert "The train <ins>leaves</ins> at eight today &lt;script&gt;" in sample
    assert "The train <del>departs</del> at eight today" in sample


def test_an_old_manifest_still_renders():
    table = sample_triplets(rows_per_pair=2)
    page = report.render_report({"version": "v1"}, table, schema.empty(schema.DROPPED))
    assert "does not say which margin pairs needed" in page
    assert "does not say how many candidates the guards checked" in page
    assert page.count("<svg") == 4


@pytest.mark.slow  # two builds and a report
def test_write_report_puts_it_where_publishing_attaches_it(tmp_path):
    table = sample_triplets(rows_per_pair=3)
    dropped = sample_dropped(table["source_id"].to_pylist()[:1])
    attached = store.publish_triplets(table, str(tmp_path), "demo", {"rank_by": "chrf"},
                                      dropped=dropped, attachments=report.attachment)
    later = store.publish_triplets(table, str(tmp_path), "demo", {"rank_by": "chrf"},
                                   dropped=dropped)
    path = report.write_report(str(tmp_path), name="demo")  # latest: the one without it
    folder = store.version_path(str(tmp_path), later, name="demo")
    assert path == f"{folder}/__attachments__/report.html"
    page = Path(path).read_text(encoding="utf-8")
    assert later in page and "single_candidate" in page
    # Read in checked batches, it is the page of the whole tables.
    assert page == report.render_report(
        store.read_manifest(str(tmp_path), later, name="demo"),
        store.read_triplets_table(str(tmp_path), later, name="demo"),
        store.read_dropped(str(tmp_path), later, name="demo"))
    # Publishing with the hook lists the same page (rendering is deterministic) in the manifest.
    manifest = store.read_manifest(str(tmp_path), attached, name="demo")
    assert report.REPORT_FILE in [entry["path"] for entry in manifest["attachments"]]
    folder = Path(store.version_path(str(tmp_path), attached, name="demo"))
    written = (folder / report.REPORT_FILE).read_text(encoding="utf-8")
    assert written == report.render_report(
        manifest, store.read_triplets_table(str(tmp_path), attached, name="demo"),
        store.read_dropped(str(tmp_path), attached, name="demo"))
    assert len(store.read_triplets(str(tmp_path), name="demo")) == table.num_rows
    # A file changed since publishing is refused before the page is rendered.
    part = next(Path(store.version_path(str(tmp_path), later, name="demo")).glob(
        "de-en/part-*.parquet"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0x01
    part.write_bytes(bytes(data))
    with pytest.raises(store.StoreError, match=r"de-en/part-00000\.parquet: sha256 mismatch"):
        report.write_report(str(tmp_path), name="demo")


# ---- in the browser -------------------------------------------------------------------------

PLANTED = {
    "console": "<h1>hello</h1><p>text</p><script>console.error('boom')</script>",
    "exception": "<h1>hello</h1><p>text</p><script>throw new Error('kaboom')</script>",
    "image": '<h1>hello</h1><p>text</p><img src="missing.png">',
}


@pytest.mark.slow
def test_the_checker_catches_console_errors_and_broken_images(tmp_path, chromium):
    for kind, body in PLANTED.items():
        path = tmp_path / f"{kind}.html"
        path.write_text(f"<!DOCTYPE html><html><body>{body}</body></html>")
        found = open_page(chromium, path, tmp_path / f"{kind}.png")["problems"]
        assert found, kind
    assert any("boom" in p for p in open_page(chromium, tmp_path / "console.html",
                                              tmp_path / "c.png")["problems"])


@pytest.mark.slow
def test_the_checker_catches_a_blank_page(tmp_path, chromium):
    path = tmp_path / "blank.html"
    path.write_text("<!DOCTYPE html><html><body><p style='color:white'>x</p></body></html>")
    result = open_page(chromium, path, tmp_path / "blank.png")
    assert result["problems"] == [] and blank(tmp_path / "blank.png")


@pytest.mark.slow
def test_the_demo_report_opens_cleanly_in_chromium(tmp_path, chromium):
    from cpo_data import build
    from pipelines import demo

    result = build.run_build(demo.demo_config(str(tmp_path / "store")))
    path = Path(report.write_report(result.dataset_uri))
    shot = tmp_path / "report.png"
    page = open_page(chromium, path, shot)
    assert page["problems"] == []
    assert blank(shot) is None
    assert page["title"] == f"demo {result.version}: cpo-data report"
    pairs = len(result.lang_pairs)
    assert page["sections"] == 1 + pairs and page["svgs"] == 2 * pairs
    assert page["text"] > 2000


def tied_triplets(seed: int) -> pa.Table:
    """Triplets of three pairs whose margins repeat (ties at the picks' ranks), some without
    a margin, in a shuffled order: one pair with more margins than the sample takes, one
    with fewer (its unscored rows fill the sample up), one with none at all."""
    import random

    rng = random.Random(seed)
    rows = sample_triplets(rows_per_pair=40, pairs=("de-en", "en-de", "cs-en"), seed=seed)
    rows = rows.to_pylist()
    for row in rows:
        if row["lang_pair"] == "de-en":
            row["margin"] = rng.choice([0.1, 0.2, 0.2, 0.3, None])
        elif row["lang_pair"] == "en-de":
            row["margin"] = rng.choice([0.5, None, None, None, None, None, None, None, None])
        else:
            row["margin"] = None
        if row["margin"] is None:
            row["chosen_score"] = row["rejected_score"] = None
            row["chosen_scores"] = row["rejected_scores"] = []
    rng.shuffle(rows)
    return pa.Table.from_pylist(rows, schema=schema.TRIPLETS)


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow)
                                       for s in range(1, 4))])  # about 2 s a seed
def test_the_page_read_in_batches_equals_the_page_read_whole(seed):
    """The page is gathered batch by batch (so it costs memory per batch, not per version):
    every batch size gives the page of the whole table in one batch, and the second pass
    picks the sample `sample` picks from all of a pair's rows, ties and unscored rows too."""
    table = tied_triplets(seed)
    dropped = labelled_dropped(table)
    whole = report.render_report(manifest(), table, dropped, batch_rows=table.num_rows)
    for batch_rows in (1, 7, 64):
        assert report.render_report(manifest(), table, dropped, batch_rows=batch_rows) == whole
    facts = report.gather(table, dropped, batch_rows=5)
    rows = table.to_pylist()
    for pair, picked in report.samples(table, facts, batch_rows=5).items():
        expected = report.sample([r for r in rows if r["lang_pair"] == pair])
        assert [r["id"] for r in picked] == [r["id"] for r in expected] and len(picked) == 5


@pytest.mark.parametrize("seed", range(4))
def test_a_margin_many_pairs_share_keeps_only_the_rows_a_pick_reaches(seed):
    """The sample's second pass trims each tied margin's rows to the smallest ids a pick can
    reach (so a margin shared by a million pairs does not keep a million rows): with 900
    rows on three margins, far past the trim point, it still picks what `sample` picks from
    all the rows."""
    import random

    rng = random.Random(seed)
    rows = sample_triplets(rows_per_pair=900, pairs=("de-en",), seed=seed).to_pylist()
    for row in rows:
        row["margin"] = rng.choice([0.1, 0.2, 0.2, 0.3])
    rng.shuffle(rows)
    table = pa.Table.from_pylist(rows, schema=schema.TRIPLETS)
    facts = report.gather(table, None, batch_rows=50)
    picked = report.samples(table, facts, batch_rows=50)["de-en"]
    assert [r["id"] for r in picked] == [r["id"] for r in report.sample(rows)]
    assert len(picked) == report.SAMPLE_PAIRS
