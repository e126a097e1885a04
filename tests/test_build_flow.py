"""The build flow end to end on tiny local models, under Prefect's test harness.

Prefect's test harness (a temporary database and server) is started once for this module.
"""

from __future__ import annotations

import json

import pytest
import yaml

from cpo_data import build, leftovers, store
from cpo_data.config import ConfigError, load_config
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet
from pipelines.demo import REPO_ROOT
from tests.conftest import processes_with_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_server")]

DEMO_ROWS = [json.loads(line) for line in
             (REPO_ROOT / "data/demo/demo.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"causal": str(build_tiny_causal_lm(root / "causal")),
            "kiwi": str(build_tiny_comet(root / "kiwi", "kiwi"))}


def write_config(folder, models, rows, **overrides):
    (folder / "sources.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = {
        "sources": [{"path": "sources.jsonl", "src_lang_column": "src_lang",
                     "tgt_lang_column": "tgt_lang", "systems": {"system_a": "system_a",
                                                                "system_b": "system_b"},
                     "label_column": "delta", "label_positive": "system_a",
                     "label_negative": "system_b"}],
        "generate": {"include_reference": True,
                     "models": [{"name": "tiny", "model": models["causal"],
                                 "max_new_tokens": 6, "strategy": "greedy"}]},
        "score": {"scorers": [{"name": "kiwi", "model": models["kiwi"]},
                              {"name": "chrf", "kind": "chrf"}],
                  "ensembles": [{"name": "kiwi_chrf", "members": ["kiwi", "chrf"]}]},
        "select": {"use_human_labels": False, "rank_by": "kiwi"},
        "publish": {"uri": "store", "name": "flowtest"},
        "work_dir": "work",
        "shard_size": 8,
    }
    config.update(overrides)
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_flow_publishes_a_version_with_artifacts_and_event(tmp_path, models, events):
    from pipelines.build import PUBLISHED_EVENT, build_triplets

    rows = DEMO_ROWS[:20]
    summary = build_triplets(str(write_config(tmp_path, models, rows)), retries=0)
    assert summary["shards"] == 3 and summary["shards_reused"] == 0
    # Finished shards are kept under the config's work_dir as Parquet and JSON, one record
    # per task and one per shard's sources (read before the tasks; a table, its drops and its
    # carried scores), and nothing Prefect would unpickle.
    staged = tmp_path / "work" / "shards"
    for stage, files in (("generate", 2), ("score", 2), ("sources", 3)):
        assert len(list(staged.glob(f"{stage}-*.json"))) == 3
        assert len(list(staged.glob(f"{stage}-*.parquet"))) == 3 * files
    assert not (tmp_path / "work" / "task-results").exists()
    assert summary["generated"] == {"tiny": 20}
    frame = store.read_triplets(str(tmp_path / "store"), name="flowtest", verify=True)
    assert len(frame) == summary["triplets"] > 0
    assert (frame["chosen_score"] > frame["rejected_score"]).all()
    assert set(frame["selected_by"]) == {"score"}
    dropped = store.read_dropped(str(tmp_path / "store"), name="flowtest")
    sources = load_config(tmp_path / "build.yaml")
    covered = set(frame["source_id"]) | set(dropped["source_id"])
    from cpo_data.sources import load_sources
    assert covered == set(load_sources(sources.sources).table.column("source_id").to_pylist())
    assert summary["agreement"]["labelled"] == 20 and summary["agreement"]["compared"] == 20
    chosen_total = sum(s["chosen"] for s in summary["systems"])
    assert chosen_total >= summary["triplets"]

    (event,) = [e for e in events() if e.event == PUBLISHED_EVENT]
    assert event.payload["version"] == summary["version"]
    assert event.payload["name"] == "flowtest"
    assert event.payload["dataset_uri"] == store.dataset_uri(str(tmp_path / "store"),
                                                             "flowtest")
    assert event.resource.id == "cpo-data.dataset.flowtest"

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["flowtest-lang-pairs", "flowtest-drops", "flowtest-systems",
                  "flowtest-summary"])))
    by_key = {a.key: a for a in artifacts}
    assert set(by_key) == {"flowtest-lang-pairs", "flowtest-drops", "flowtest-systems",
                           "flowtest-summary"}
    pairs = json.loads(by_key["flowtest-lang-pairs"].data)
    assert {p["lang_pair"]: p["triplets"] for p in pairs} == frame["lang_pair"].value_counts(
    ).to_dict()
    assert "agrees on" in by_key["flowtest-summary"].data


def test_rerun_generates_and_scores_nothing_and_growth_costs_only_new_rows(tmp_path, models):
    from pipelines.build import build_triplets

    config = write_config(tmp_path, models, DEMO_ROWS[:40])
    first = build_triplets(str(config), retries=0)
    assert first["generated"] == {"tiny": 40} and first["scored"]["kiwi"] > 0
    assert (first["previous_version"], first["sources_new"], first["sources_reused"]) == (
        None, 40, 0)

    again = build_triplets(str(config), retries=0)
    assert again["generated"] == {} and again["scored"] == {}
    assert again["shards_reused"] == again["shards"] == 5
    assert again["triplets"] == first["triplets"]
    # Equal triplets: nothing published, the summary names the version they equal.
    assert again["unchanged"] and again["version"] == first["version"]

    # Only batch sizes, budgets and the device changed, which change no output: every shard's
    # finished work is reused.
    batched = write_config(
        tmp_path, models, DEMO_ROWS[:40],
        generate={"include_reference": True,
                  "models": [{"name": "tiny", "model": models["causal"], "max_new_tokens": 6,
                              "strategy": "greedy", "token_budget": 999, "max_batch_size": 3,
                              "device": "cpu"}]},
        score={"scorers": [{"name": "kiwi", "model": models["kiwi"], "max_batch_size": 2,
                            "token_budget": 512, "device": "cpu"},
                           {"name": "chrf", "kind": "chrf"}],
               "ensembles": [{"name": "kiwi_chrf", "members": ["kiwi", "chrf"]}]})
    rebatched = build_triplets(str(batched), retries=0)
    assert rebatched["shards_reused"] == rebatched["shards"] == 5
    assert rebatched["generated"] == {} and rebatched["scored"] == {}
    assert rebatched["unchanged"] and rebatched["version"] == first["version"]

    # 10% more sources, appended: only they are generated and scored.
    grown = write_config(tmp_path, models, DEMO_ROWS[:44])
    more = build_triplets(str(grown), retries=0)
    assert more["generated"] == {"tiny": 4}
    new_sources = build.load_build_sources(load_config(grown)).table.slice(40, 4)
    new_candidates = build.generate_shard(new_sources, build.with_work_dir(load_config(grown)))
    assert more["scored"] == {"kiwi": new_candidates.table.num_rows,
                              "chrf": new_candidates.table.num_rows}
    assert more["shards_reused"] == 5  # the 40 old sources' shards were untouched
    assert (more["previous_version"], more["sources_new"], more["sources_reused"]) == (
        rebatched["version"], 4, 40)
    versions = store.list_versions(str(tmp_path / "store"), name="flowtest")
    assert not more["unchanged"]
    assert len(versions) == 2 and versions[-1]["rows"] == more["triplets"]


def test_a_failing_shard_publishes_nothing_and_the_rerun_resumes(tmp_path, models,
                                                                monkeypatch):
    from pipelines.build import build_triplets

    config = write_config(tmp_path, models, DEMO_ROWS[:24])
    real_score_shard = build.score_shard
    poisoned = DEMO_ROWS[20]["src"]

    def failing(candidates, shard, config):
        if poisoned in shard.column("src").to_pylist():
            raise RuntimeError("GPU fell off the bus")
        return real_score_shard(candidates, shard, config)

    monkeypatch.setattr(build, "score_shard", failing)
    with pytest.raises(RuntimeError, match="fell off"):
        build_triplets(str(config), retries=0)
    assert not list(tmp_path.rglob(store.MANIFEST))  # no version, not even a partial one

    monkeypatch.setattr(build, "score_shard", real_score_shard)
    summary = build_triplets(str(config), retries=0)
    assert len(list(tmp_path.rglob(store.MANIFEST))) == 1  # the check above looks where it should
    assert summary["shards_reused"] == 2  # shards 1 and 2 finished in the failed run
    assert summary["generated"] == {}  # shard 3's generation had finished too
    assert summary["scored"]["kiwi"] > 0  # only shard 3 is scored now
    assert len(store.list_versions(str(tmp_path / "store"), name="flowtest")) == 1


@pytest.mark.parametrize(("error", "retried"), [
    (OSError("connection reset by peer"), True),
    (RuntimeError("CUDA error: an illegal memory access"), True),
    (ValueError("bad row"), False),
    (ConfigError("select.rank_by: not a scorer"), False),
])
def test_only_transient_failures_are_retried(error, retried):
    from pipelines.build import _retry_transient

    class FailedState:
        def result(self):
            raise error

    assert _retry_transient(None, None, FailedState()) is retried


def test_a_build_killed_midway_resumes_from_its_finished_shards_and_publishes_once(
        tmp_path, models):
    """SIGKILL to the build alone, after some shards have stored their results: the Prefect
    server it started goes too (a parent-death signal), nothing is published, and the rerun
    reuses the finished shards and publishes one version."""
    import contextlib
    import os
    import shutil
    import signal
    import subprocess
    import time

    from pipelines.build import build_triplets

    config = write_config(tmp_path, models, DEMO_ROWS[:80])  # 10 shards of 8
    results = tmp_path / "work" / "shards"
    exe = shutil.which("cpo-data") or str(REPO_ROOT / ".venv/bin/cpo-data")
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect-home"))
    env.pop("PREFECT_API_URL", None)
    build_process = subprocess.Popen([exe, "build", str(config)], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
    deadline = time.monotonic() + 180
    try:
        # Every shard is generated before any is scored: kill once two shards' scores are
        # stored, in the middle of the scoring phase.
        while not (results.is_dir() and len(list(results.glob("score-*.json"))) >= 2):
            assert build_process.poll() is None, "the build ended before it could be killed"
            assert time.monotonic() < deadline, "no shard finished within 180 s"
            time.sleep(0.05)
        os.kill(build_process.pid, signal.SIGKILL)  # the build only: no cleanup runs
        build_process.wait()
        left = processes_with_env(f"PREFECT_HOME={tmp_path / 'prefect-home'}")
        while left and time.monotonic() < deadline:  # the server shuts down on its signal
            time.sleep(0.1)
            left = processes_with_env(f"PREFECT_HOME={tmp_path / 'prefect-home'}")
        assert left == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build_process.pid, signal.SIGKILL)  # whatever a failure left
        build_process.wait()
    generated_before = len(list(results.glob("generate-*.json")))
    finished = len(list(results.glob("score-*.json")))
    assert not list(tmp_path.rglob(store.MANIFEST))  # nothing published by the killed run

    # A temporary file the kill may have left (its writer is gone) is swept by the rerun.
    host, _, start = leftovers.owner_tag().split("_")
    planted = results / f".tmp-{host}_{build_process.pid}_{start}_killed"
    planted.write_bytes(b"half a shard")
    summary = build_triplets(str(config), retries=0)
    assert not planted.exists() and not list(results.glob(".tmp-*"))
    assert summary["shards"] == 10
    assert finished <= summary["shards_reused"] < 10
    assert sum(summary["generated"].values()) <= 80 - 8 * generated_before
    assert len(store.list_versions(str(tmp_path / "store"), name="flowtest")) == 1
    assert len(list(tmp_path.rglob(store.MANIFEST))) == 1  # the check above looks where it should
