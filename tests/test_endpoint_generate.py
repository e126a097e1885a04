"""Candidates from a served model (`generate.endpoints`): a chat-completions server on
127.0.0.1 (`cpo_data.chat_server`), reached through the real `openai` client over HTTP."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path

import pytest
import yaml

from cpo_data import cache
from cpo_data.backends.openai_generate import EndpointGenerator, backoff_s, retry_after_s
from cpo_data.chat_server import ChatServer
from cpo_data.config import ConfigError, GenerateConfig
from cpo_data.config_endpoint import GPT4_SYSTEM_PROMPT, EndpointConfig
from cpo_data.generate import REQUEST_FAILED, GenerateError, generate_candidates
from tests.conftest import REPO_ROOT, write_jsonl
from tests.test_generate import _sources

KEY = "sk-test-7f3a9c-not-a-real-key"
WORDS = ["Hund", "Katze", "Maus", "Vogel", "Fisch", "Pferd", "Kuh", "Schaf", "Ziege", "Esel"]


@pytest.fixture
def server():
    with ChatServer() as running:
        yield running


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("CPO_TEST_KEY", KEY)
    return "CPO_TEST_KEY"


def endpoint(server, key, **settings):
    settings = {"name": "gpt", "model": "gpt-4-1106-preview", "base_url": server.url,
                "api_key_env": key, "backoff_s": 0.01, "max_backoff_s": 0.05,
                "timeout_s": 5.0, **settings}
    return EndpointConfig(**settings)


def sentences(n):
    return [f"Der {WORDS[i % len(WORDS)]} Nummer {i} schläft im Garten." for i in range(n)]


def candidates(config, texts, cache_dir=None):
    generate = GenerateConfig(provided_systems=(), endpoints=(config,), cache_dir=cache_dir)
    generator = EndpointGenerator(config)
    return generate_candidates(_sources(texts), generate, [generator]), generator


def test_candidates_land_in_the_table_from_alma_r_s_gpt4_prompt(server, key):
    config = endpoint(server, key, max_tokens=100, seed=7)
    texts = sentences(4)
    found, _ = candidates(config, texts)
    rows = found.table.to_pylist()
    assert [r["text"] for r in rows] == [" ".join(reversed(t.split())) for t in texts]
    assert all(r["systems"] == ["gpt"] and r["stopped_at_limit"] is False for r in rows)
    assert json.loads(rows[0]["decoding"]) == {"max_tokens": 100, "n": 1, "seed": 7,
                                               "temperature": 0.0, "top_p": 1.0}
    body = server.seen[0].body
    assert body["model"] == "gpt-4-1106-preview" and "n" not in body
    assert body["seed"] == 7 and body["max_tokens"] == 100 and body["temperature"] == 0.0
    assert body["messages"][0] == {"role": "system", "content": GPT4_SYSTEM_PROMPT}
    assert len(body["messages"]) == 2 and set(server.users()) == {
        f"### Translate this from German to English, German: {t} ### English:" for t in texts}
    assert server.seen[0].authorization == f"Bearer {KEY}"
    assert found.report.requests["gpt"]["sent"] == 4
    assert found.report.requests["gpt"]["prompt_tokens"] > 0
    assert found.report.requests["gpt"]["completion_tokens"] == sum(len(t.split()) for t in texts)


def test_several_choices_become_several_candidates_and_a_length_stop_is_flagged(server, key):
    server.answer = lambda model, user, choice: f"answer {choice}"
    config = endpoint(server, key, n=3, temperature=0.7)
    found, _ = candidates(config, sentences(1))
    assert [r["text"] for r in found.table.to_pylist()] == ["answer 0", "answer 1", "answer 2"]
    assert server.seen[0].body["n"] == 3


def test_429_with_retry_after_500_and_a_slow_answer_are_retried_and_counted(server, key):
    texts = sentences(5)
    server.fail(429, when=texts[1], retry_after=0.4)
    server.fail(500, when=texts[2], times=2)
    server.slow[texts[3]] = 2.0  # past timeout_s: the client gives up and asks again
    found, generator = candidates(endpoint(server, key, timeout_s=0.5, max_backoff_s=1.0),
                                  texts)
    assert found.table.num_rows == 5 and found.dropped.num_rows == 0
    assert generator.request_counts() == {**generator.request_counts(), "sent": 5, "retried": 4,
                                          "failed": 0}
    users = server.users(status=None)
    for text, asked in ((texts[0], 1), (texts[1], 2), (texts[2], 3), (texts[3], 2)):
        assert sum(text in u for u in users) == asked
    # The retry after the 429 came no sooner than the server asked (a lower bound only).
    arrivals = [s.at for s in server.seen if texts[1] in s.body["messages"][-1]["content"]]
    assert arrivals[1] - arrivals[0] >= 0.4


def test_a_retry_after_past_max_backoff_waits_max_backoff_and_unreadable_ones_are_ignored(
        server, key):
    """One header asking for an hour (or for infinity) must not hold the shard that long."""
    texts = sentences(2)
    server.fail(429, when=texts[0], retry_after=3600)
    server.fail(429, when=texts[1], retry_after=float("inf"))
    started = time.monotonic()
    found, _ = candidates(endpoint(server, key, max_backoff_s=0.2), texts)
    assert found.table.num_rows == 2 and time.monotonic() - started < 60


def test_a_400_is_not_retried_and_drops_that_candidate_with_the_server_s_message(server, key):
    texts = sentences(4)
    server.fail(400, when=texts[2], message="this model does not take that prompt")
    found, generator = candidates(endpoint(server, key, max_failed_share=0.25), texts)
    assert sum(texts[2] in u for u in server.users(status=None)) == 1
    drop = found.dropped.to_pylist()
    assert [d["reason"] for d in drop] == [REQUEST_FAILED]
    assert drop[0]["detail"] == "gpt: HTTP 400: this model does not take that prompt"
    assert found.table.num_rows == 3 and generator.request_counts()["failed"] == 1


def test_the_key_is_taken_out_of_a_server_s_message_before_it_is_kept(server, key):
    """Some servers repeat the key they refused: the reason is published (the dropped row's
    detail, the report), so the key never reaches it."""
    texts = sentences(2)
    server.fail(401, when=texts[0], message=f"Incorrect API key provided: {KEY}")
    server.fail(403, when=texts[1], message=f"header was Bearer {KEY}")
    found, _ = candidates(endpoint(server, key, max_failed_share=1.0), texts)
    details = [d["detail"] for d in found.dropped.to_pylist()]
    assert details == ["gpt: HTTP 401: Incorrect API key provided: [api key]",
                       "gpt: HTTP 403: header was Bearer [api key]"]


def test_a_malformed_answer_fails_its_request_and_not_the_shard(server, key):
    texts = sentences(3)
    original = server._respond

    def broken(body, authorization):
        status, payload, headers = original(body, authorization)
        user = body["messages"][-1]["content"]
        if texts[0] in user:
            payload["choices"][0]["message"] = None
        if texts[1] in user:
            payload = {"error": {"message": "model overloaded"}}
        return status, payload, headers

    server._respond = broken
    found, _ = candidates(endpoint(server, key, max_failed_share=1.0), texts)
    assert [d["detail"] for d in found.dropped.to_pylist()] == [
        "gpt: the server answered a choice without a message",
        "gpt: the server answered with no choices: model overloaded"]
    assert found.table.num_rows == 1


def test_a_rerun_judges_the_failures_against_the_whole_shard(server, key, tmp_path):
    """One source a server always refuses is within the share on the first run; on a
    rerun it is the only request sent, and must still pass."""
    texts = sentences(10)
    server.fail(400, when=texts[4], times=99)
    config = endpoint(server, key, max_failed_share=0.1)
    for _ in range(2):
        found, _ = candidates(config, texts, cache_dir=str(tmp_path / "cache"))
        assert found.table.num_rows == 9
    assert sum(texts[4] in u for u in server.users(status=None)) == 2


def test_generating_from_inside_a_running_event_loop_works_and_raises_what_fails(server, key):
    """A notebook's thread runs an event loop: the requests run in a loop of their own, and
    an error there comes back to the caller."""
    import asyncio

    async def in_a_loop(config):
        return EndpointGenerator(config).generate(_requests(2))

    results = asyncio.run(in_a_loop(endpoint(server, key)))
    assert [r.failed for r in results] == [None, None] and len(server.seen) == 2

    def refuse(index, generated):
        raise RuntimeError(f"refused candidate {index}")

    async def refusing_in_a_loop(config):
        EndpointGenerator(config).generate_each(_requests(1), refuse)

    with pytest.raises(RuntimeError, match="refused candidate 0"):
        asyncio.run(refusing_in_a_loop(endpoint(server, key)))


def _requests(n):
    from cpo_data.generate import Request
    from cpo_data.sources import source_id

    return [Request(source_id("de", "en", t), "de", "en", t) for t in sentences(n)]


def test_retries_give_up_after_max_retries_and_name_how_many(server, key):
    texts = sentences(2)
    server.fail(503, when=texts[0], times=10, message="overloaded")
    found, generator = candidates(endpoint(server, key, max_retries=3, max_failed_share=0.5),
                                  texts)
    assert sum(texts[0] in u for u in server.users(status=None)) == 4  # one and three retries
    assert found.dropped.to_pylist()[0]["detail"] == "gpt: HTTP 503: overloaded (after 3 retries)"
    assert generator.request_counts()["retried"] == 3


def test_an_unreachable_server_is_retried_then_fails(key):
    with ChatServer() as gone:
        url = gone.url
    config = EndpointConfig(name="gpt", model="m", base_url=url, api_key_env=key,
                            backoff_s=0.01, max_backoff_s=0.02, max_retries=2,
                            max_failed_share=1.0)
    found, generator = candidates(config, sentences(1))
    assert generator.request_counts()["retried"] == 2
    assert found.dropped.to_pylist()[0]["detail"].startswith("gpt: APIConnectionError")


def test_more_failures_than_the_share_allows_stop_the_stage_but_keep_what_came(
        server, key, tmp_path):
    texts = sentences(10)
    for text in texts[:3]:
        server.fail(400, when=text)
    config = endpoint(server, key, max_failed_share=0.2)
    with pytest.raises(GenerateError, match=r"gpt: 3 of 10 sources' requests failed, more than "
                                            r"max_failed_share 0.2; the first: HTTP 400"):
        candidates(config, texts, cache_dir=str(tmp_path / "cache"))
    before = len(server.seen)
    found, _ = candidates(config, texts, cache_dir=str(tmp_path / "cache"))
    asked_again = server.users(status=None)[before:]
    assert len(asked_again) == 3 and all(any(t in u for t in texts[:3]) for u in asked_again)
    assert found.table.num_rows == 10


def test_concurrency_is_bounded_and_used(server, key):
    server.delay_s = 0.2
    candidates(endpoint(server, key, max_concurrency=3), sentences(12))
    assert server.most_in_flight == 3


def test_the_cache_keys_on_model_decoding_and_prompt_not_on_url_or_key(
        server, key, tmp_path, monkeypatch):
    texts = sentences(3)
    cache_dir = str(tmp_path / "cache")
    candidates(endpoint(server, key), texts, cache_dir)
    assert len(server.seen) == 3
    with ChatServer() as elsewhere:
        monkeypatch.setenv("CPO_OTHER_KEY", "sk-another")
        moved = endpoint(elsewhere, "CPO_OTHER_KEY")
        found, _ = candidates(moved, texts, cache_dir)
        assert elsewhere.seen == [] and found.table.num_rows == 3
        for change in ({"model": "gpt-4o"}, {"temperature": 0.5}, {"seed": 1},
                       {"user_prompt": "Translate into {Tgt}: {src}"}, {"system_prompt": None}):
            before = len(elsewhere.seen)
            candidates(endpoint(elsewhere, "CPO_OTHER_KEY", **change), texts, cache_dir)
            assert len(elsewhere.seen) - before == 3, change


def test_values_are_saved_as_they_come_and_what_came_is_saved_when_it_stops(tmp_path):
    """`cached_compute_each`: a stage stopped mid-way (an error here, a kill in the build
    test below) finds on its next run what had come before."""
    store = cache.ContentCache(str(tmp_path), "t")

    def half_then_stop(items, done):
        for index in range(len(items) // 2):
            done(index, items[index].upper())
        raise KeyboardInterrupt

    items = [f"item {i}" for i in range(10)]
    with pytest.raises(KeyboardInterrupt):
        cache.cached_compute_each(store, items, lambda s: s, half_then_stop, str, str)
    asked = []

    def record(items, done):
        asked.extend(items)
        for index, item in enumerate(items):
            done(index, item.upper())

    values, computed = cache.cached_compute_each(store, items, lambda s: s, record, str, str)
    assert values == [i.upper() for i in items] and computed == 5 and asked == items[5:]


def test_retry_after_reads_seconds_milliseconds_and_dates():
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28 <= retry_after_s({"retry-after": when}) <= 30
    assert retry_after_s({"retry-after": "soon"}) is None and retry_after_s({}) is None


def test_backoff_doubles_up_to_its_ceiling_with_jitter():
    import random

    config = EndpointConfig(name="g", model="m", backoff_s=1.0, max_backoff_s=5.0)
    rng = random.Random(0)
    for retry, ceiling in enumerate([1, 2, 4, 5, 5]):
        waits = [backoff_s(config, retry, rng) for _ in range(200)]
        assert ceiling / 2 <= min(waits) and max(waits) <= ceiling
        assert max(waits) - min(waits) > ceiling / 4  # spread: not all at once


@pytest.mark.parametrize("settings, message", [
    ({"base_url": "127.0.0.1:8000"}, "base_url: '127.0.0.1:8000' is not an http(s) URL"),
    ({"n": 2}, "n: more than one candidate needs temperature above 0"),
    ({"max_failed_share": 1.5}, "max_failed_share: must be in [0, 1]"),
    ({"user_prompt": "Translate"}, "user_prompt: must contain {src}"),
    ({"kind": "anthropic"}, "kind: 'anthropic' is not one of openai_compatible"),
    ({"base_url": "https://me:secret@example.com/v1"},
     "base_url: holds a user or password; put the key in the variable api_key_env names"),
])
def test_bad_settings_name_their_key(settings, message):
    with pytest.raises(ConfigError) as error:
        EndpointConfig(name="g", model="m", **settings)
    assert str(error.value) == message


# ---- in a build ---------------------------------------------------------------------------------

def write_build(tmp_path: Path, url: str, key_env: str, n: int, **endpoint_settings) -> Path:
    rows = [{"src_lang": "de", "tgt_lang": "en", "src": text, "ref": f"The reference {i}."}
            for i, text in enumerate(sentences(n))]
    write_jsonl(tmp_path / "sources.jsonl", rows)
    off = {"enabled": False}
    config = {
        "sources": [{"path": "sources.jsonl", "format": "jsonl", "src_lang_column": "src_lang",
                     "tgt_lang_column": "tgt_lang", "src_column": "src", "ref_column": "ref"}],
        "generate": {"provided_systems": [], "include_reference": True, "endpoints": [{
            "name": "gpt-4", "model": "gpt-4-1106-preview", "base_url": url,
            "api_key_env": key_env, "backoff_s": 0.01, **endpoint_settings}]},
        "score": {"scorers": [{"name": "chrf", "kind": "chrf"}]},
        "guards": {name: off for name in ("copy_of_source", "off_target", "length_ratio",
                                          "repetition", "truncated_generation",
                                          "critical_error")},
        "select": {"rank_by": "chrf", "min_margin": 0.0},
        "publish": {"uri": "store", "name": "mt"},
        "work_dir": "work",
        "shard_size": 1000,
    }
    path = tmp_path / "build.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_a_build_counts_the_requests_and_writes_the_key_nowhere(server, key, tmp_path, caplog,
                                                                capsys):
    from cpo_data import build, store
    from pipelines.project import load_project

    path = write_build(tmp_path, server.url, key, 6)
    server.fail(429, retry_after=0.01)
    with caplog.at_level("DEBUG"):
        summary = build.run_build(load_project(path).need_build())
    assert summary.triplets == 6 and summary.generated == {"gpt-4": 6}
    counts = summary.requests["gpt-4"]
    assert (counts["sent"], counts["retried"], counts["failed"]) == (6, 1, 0)
    manifest = store.read_manifest(summary.dataset_uri)
    assert manifest["provenance"]["requests"] == summary.requests
    assert manifest["provenance"]["config"]["generate"]["endpoints"][0]["api_key_env"] == key
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert KEY not in caplog.text
    from pipelines.printing import print_build_summary

    print_build_summary(dataclasses.asdict(summary), 0)
    assert ("requests        gpt-4: 6 sent, 1 retried, 0 failed; tokens "
            f"{counts['prompt_tokens']} prompt + {counts['completion_tokens']} completion"
            ) in capsys.readouterr().out


def test_a_missing_key_stops_the_build_before_anything_is_sent(server, tmp_path, monkeypatch):
    from cpo_data import build
    from pipelines.project import load_project

    monkeypatch.delenv("CPO_UNSET_KEY", raising=False)
    path = write_build(tmp_path, server.url, "CPO_UNSET_KEY", 3)
    with pytest.raises(ConfigError, match=r"generate\.endpoints\[0\]\.api_key_env: "
                                          r"CPO_UNSET_KEY is not set in the environment"):
        build.run_build(load_project(path).need_build())
    published = [p for p in (tmp_path / "store").rglob("manifest.json")]
    assert server.seen == [] and published == []


KILLED_BUILD = textwrap.dedent("""
    import sys
    from cpo_data import build, cache
    from pipelines.project import load_project

    cache.SAVE_EVERY = 1  # each candidate stored as it comes: the kill can land anywhere
    build.run_build(load_project(sys.argv[1]).need_build())
""")


@pytest.mark.slow  # two builds in fresh interpreters
def test_a_build_killed_mid_way_pays_for_no_candidate_twice(server, key, tmp_path):
    """SIGKILL while requests are in flight, then a rerun: the server gets no request for
    a source whose candidate the first run had stored, and the rerun finishes the set."""
    from cpo_data import build
    from pipelines.project import load_project

    n = 40
    server.delay_s = 0.05
    path = write_build(tmp_path, server.url, key, n, max_concurrency=2)
    first = subprocess.Popen([sys.executable, "-c", KILLED_BUILD, str(path)],
                             env=dict(os.environ, HF_HUB_OFFLINE="1"), cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(server.users()) < n // 2:
            assert first.poll() is None, first.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the build sent too few requests in 120 s"
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        with contextlib.suppress(ProcessLookupError):
            first.kill()
    answered = set(server.users())
    assert n // 2 <= len(answered) < n  # the kill came mid-way
    config = load_project(path).need_build()
    stored = cache.open_cache(str(tmp_path / "work" / "cache"), "generate",
                              EndpointGenerator(config.generate.endpoints[0]).identity)
    had = {text for text in sentences(n)
           if stored.get_many([_key(text)])}
    assert had and len(had) >= len(answered) - 2  # stored as they came (at most 2 in flight)
    before = len(server.seen)
    summary = build.run_build(config)
    asked_again = server.users(status=None)[before:]
    assert not any(text in user for text in had for user in asked_again)
    assert len(asked_again) == n - len(had)
    assert summary.triplets == n and summary.requests["gpt-4"]["sent"] == n - len(had)


def _key(text: str) -> str:
    from cpo_data.generate import Request, request_key
    from cpo_data.sources import source_id

    return request_key(Request(source_id("de", "en", text), "de", "en", text))



def test_alma_r_s_gpt4_candidate_in_the_recipe_is_this_backend_with_the_paper_s_prompt(
        tmp_path, key):
    """configs/alma-r.yaml's commented GPT-4 endpoint, uncommented, is a valid endpoint
    with ALMA-R's prompt (the defaults), beside the reference and ALMA."""
    from pipelines.project import load_project

    lines = (REPO_ROOT / "configs" / "alma-r.yaml").read_text(encoding="utf-8").splitlines()
    start = lines.index("  # endpoints:")
    block = []
    for line in lines[start:]:
        if not line.startswith("  # "):
            break
        block.append("  " + line[4:])
    recipe = lines[:start] + block + lines[start + len(block):]
    path = tmp_path / "alma-r.yaml"
    path.write_text("\n".join(recipe) + "\n", encoding="utf-8")
    generate = load_project(path).need_build().generate
    (gpt4,) = generate.endpoints
    defaults = EndpointConfig(name=gpt4.name, model="gpt-4-1106-preview")
    assert gpt4 == defaults and gpt4.api_key_env == "OPENAI_API_KEY"
    assert [m.name for m in generate.models] == ["alma"] and generate.include_reference


@pytest.mark.slow  # a Prefect server
@pytest.mark.usefixtures("prefect_server")
def test_the_flow_sums_the_requests_over_its_shards_and_writes_the_key_nowhere(
        server, key, tmp_path):
    from pipelines.build import build_triplets

    path = write_build(tmp_path, server.url, key, 6)
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    path.write_text(yaml.safe_dump({**config, "shard_size": 2}), encoding="utf-8")
    server.fail(500)
    summary = build_triplets(str(path), retries=0)
    assert summary["shards"] == 3 and summary["triplets"] == 6
    counts = summary["requests"]["gpt-4"]
    assert (counts["sent"], counts["retried"], counts["failed"]) == (6, 1, 0)
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert leaked == []


def test_the_progress_bar_shows_done_in_flight_retried_and_failed(server, key, monkeypatch):
    import io

    import tqdm.auto

    bars = []

    class Recorded(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.update(disable=False, file=io.StringIO(), mininterval=0)
            super().__init__(*args, **kwargs)
            bars.append(self)

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorded)
    texts = sentences(4)
    server.fail(429, when=texts[0], retry_after=0)
    server.fail(400, when=texts[1])
    candidates(endpoint(server, key, max_failed_share=0.5), texts)
    (bar,) = bars
    assert bar.n == bar.total == 4 and bar.desc == "generate gpt"
    assert bar.postfix == "in_flight=0, retried=1, failed=1"
