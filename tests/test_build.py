"""The build's plain stages: checks before any model loads, shards, and a build without Prefect."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from cpo_data import build, staging, store
from cpo_data.config import ConfigError, SourcesConfig, load_config
from tests.conftest import write_jsonl
from tests.test_build_flow import DEMO_ROWS, write_config

MODELS = {"causal": "./models/causal", "kiwi": "./models/kiwi/checkpoints/model.ckpt"}


@pytest.fixture
def no_model_loads(monkeypatch):
    """Fail the test if any model is loaded."""
    from cpo_data.backends import comet_score, hf_generate

    def refuse(*_args, **_kwargs):
        raise AssertionError("a model was loaded before the config was refused")

    monkeypatch.setattr(hf_generate, "load_generator", refuse)
    monkeypatch.setattr(comet_score, "load_scorer", refuse)


def test_missing_model_paths_are_refused_naming_the_key(tmp_path, no_model_loads):
    config = load_config(write_config(tmp_path, MODELS, DEMO_ROWS[:4]))
    with pytest.raises(ConfigError, match=r"generate\.models\[0\]\.model: .*does not exist"):
        build.run_build(config)
    (tmp_path / "models/causal").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"score\.scorers\[0\]\.model: .*does not exist"):
        build.run_build(config)


def test_missing_source_file_is_refused_naming_the_key(tmp_path, no_model_loads):
    config = load_config(write_config(tmp_path, MODELS, DEMO_ROWS[:4]))
    (tmp_path / "sources.jsonl").unlink()
    with pytest.raises(ConfigError, match=r"sources\[0\]\.path: .*sources.jsonl does not exist"):
        build.run_build(config)


def test_reference_scorer_on_data_without_references_is_refused(tmp_path, no_model_loads):
    rows = [{k: v for k, v in r.items() if k != "ref"} for r in DEMO_ROWS[:4]]
    path = write_config(tmp_path, MODELS, rows, generate={})
    data = yaml.safe_load(path.read_text())
    data["sources"][0]["ref_column"] = None
    path.write_text(yaml.safe_dump(data))
    (tmp_path / "models/kiwi/checkpoints").mkdir(parents=True)
    (tmp_path / "models/kiwi/checkpoints/model.ckpt").write_text("x")
    with pytest.raises(ConfigError, match=r"score\.scorers\[1\] \(chrf\): chrf needs one, "
                                          r"and no source has a reference"):
        build.run_build(load_config(path))


def test_unknown_provided_system_is_refused(tmp_path, no_model_loads):
    path = write_config(tmp_path, MODELS, DEMO_ROWS[:4],
                        generate={"provided_systems": ["gpt4"]},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False})
    with pytest.raises(ConfigError, match=r"generate\.provided_systems: \['gpt4'\]"):
        build.run_build(load_config(path))


@pytest.mark.slow  # a build of many shards
def test_a_shard_may_lack_a_provided_system_that_others_have(tmp_path):
    """The provided systems are checked once over the whole dataset: a shard in which every
    output of one system is empty builds, and those outputs are dropped rows."""
    rows = [dict(row, delta=None) for row in DEMO_ROWS[:4]]
    rows[2]["system_b"] = rows[3]["system_b"] = ""  # the second shard has no system_b
    path = write_config(tmp_path, MODELS, rows, shard_size=2,
                        generate={"provided_systems": ["system_a", "system_b"],
                                  "include_reference": True},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False})
    summary = build.run_build(load_config(path))
    assert summary.shards == 2 and summary.dropped["empty_system_output"] == 2
    assert summary.triplets == 4  # the second shard's pairs: system_a against the reference


def test_several_scores_need_rank_by(tmp_path):
    scorers = [{"name": "chrf", "kind": "chrf"}, {"name": "bleu", "kind": "bleu"}]
    path = write_config(tmp_path, MODELS, DEMO_ROWS[:4], select={}, score={"scorers": scorers})
    with pytest.raises(ConfigError, match=r"select\.rank_by: several scores exist"):
        load_config(path)


def test_shards_are_consecutive_and_appending_keeps_earlier_ones(tmp_path):
    from cpo_data import sources

    def parts(rows):
        config = SourcesConfig(path=str(write_jsonl(tmp_path / "s.jsonl", rows)),
                               src_lang="de", tgt_lang="en", src_column="src",
                               ref_column=None, systems={})
        scan = sources.scan_sources(config)
        return [part.table for part in sources.read_parts(scan, {}, 4)]

    rows = [{"src": f"Satz {i}."} for i in range(11)]
    first = parts(rows[:10])
    assert [p.num_rows for p in first] == [4, 4, 2]
    grown = parts(rows)
    assert [p.num_rows for p in grown] == [4, 4, 3]
    assert grown[0].equals(first[0]) and grown[1].equals(first[1])
    key = build.shard_key("generate", first[0], [])
    assert key == build.shard_key("generate", grown[0], [])
    assert key != build.shard_key("generate", first[1], [])


def test_plain_build_publishes_score_selected_triplets(tmp_path):
    """Provided systems only, chrF against the reference (the demo's recipe), no Prefect."""
    path = write_config(tmp_path, MODELS, DEMO_ROWS[:30], generate={},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False})
    lines = []
    summary = build.run_build(load_config(path), progress=lines.append)
    frame = store.read_triplets(str(tmp_path / "store"), name="flowtest")
    assert len(frame) == summary.triplets and summary.shards == len(lines) == 4
    assert set(frame["chosen_system"]) | set(frame["rejected_system"]) <= {"system_a",
                                                                            "system_b"}
    assert summary.scored == {"chrf": 60}
    assert summary.agreement["compared"] == 30
    # The version carries its report, listed (with its sha256) in the manifest.
    manifest = store.read_manifest(str(tmp_path / "store"), name="flowtest")
    listed = {e["path"]: e for e in manifest["attachments"]}
    report = Path(summary.report)
    assert report.relative_to(store.version_path(str(tmp_path / "store"), name="flowtest")
                              ).as_posix() in listed
    assert hashlib.sha256(report.read_bytes()).hexdigest() == listed[
        "__attachments__/report.html"]["sha256"]
    assert "<svg" in report.read_text()


def test_ingestion_drops_reach_the_published_version(tmp_path):
    """An empty provided output never becomes a candidate: its dropped row, naming the file
    and row, is published with the stages' own drops."""
    rows = [dict(row) for row in DEMO_ROWS[:6]]
    rows[2]["system_b"], rows[2]["delta"] = "  ", None  # a labelled row must have both
    path = write_config(tmp_path, MODELS, rows, generate={},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False})
    summary = build.run_build(load_config(path))
    dropped = store.read_dropped(str(tmp_path / "store"), name="flowtest")
    ingestion = dropped[dropped["reason"] == "empty_system_output"]
    assert len(ingestion) == 1 and ingestion["detail"].iloc[0].endswith(
        "sources.jsonl:3: system_b (system_b) is empty")
    assert summary.dropped["empty_system_output"] == 1
    manifest = store.read_manifest(str(tmp_path / "store"), name="flowtest")
    assert manifest["dropped_per_reason"]["empty_system_output"] == 1


def test_scores_kept_for_other_candidates_are_not_reused(tmp_path):
    """A shard's staged scores belong to the candidates they were computed on: when its
    generation stage holds other candidates now (made again after damage, a sampled model
    drawing anew), scoring runs again instead of pairing old scores with new texts."""
    path = write_config(tmp_path, MODELS, DEMO_ROWS[:8], generate={},
                        score={"scorers": [{"name": "chrf", "kind": "chrf"}]},
                        select={"use_human_labels": False})
    config = build.with_work_dir(load_config(path))
    first = build.run_build(config)
    assert first.scored == {"chrf": 16}
    run = build.start_build(config)
    generate_key = run.shards[0].generate_key
    kept = staging.load(config.work_dir, generate_key)
    texts = kept.table.column("text").to_pylist()
    changed = kept.table.set_column(kept.table.schema.get_field_index("text"), "text",
                                    pa.array([f"{text} (drawn again)" for text in texts]))
    staging.save(config.work_dir, generate_key, changed, kept.dropped, kept.report)
    again = build.run_build(config)
    assert again.scored == {"chrf": 16} and again.shards_reused == 0
    frame = store.read_triplets(str(tmp_path / "store"), name="flowtest")
    assert all(text.endswith("(drawn again)") for text in frame["chosen"])
