import dataclasses

import pytest

from cpo_data import build, store
from cpo_data.config import SourcesConfig
from cpo_data.sources import SourceError
from pipelines import demo
from tests.conftest import write_jsonl


def test_failed_build_publishes_nothing(tmp_path, rows):
    config = demo.demo_config(str(tmp_path / "store"))
    good = build.run_build(config)
    rows[2]["src"] = ""
    bad_file = write_jsonl(tmp_path / "bad.jsonl", rows)
    bad = SourcesConfig(path=str(bad_file), src_lang_column="src_lang",
                        tgt_lang_column="tgt_lang", systems={"a": "sys_a", "b": "sys_b"})
    config = dataclasses.replace(config, sources=config.sources + (bad,))
    with pytest.raises(SourceError, match=r"bad\.jsonl, row 3, field 'src'"):
        build.run_build(config)
    versions = store.list_versions(good.dataset_uri)
    assert [m["version"] for m in versions] == [good.version]


def test_build_provenance_names_config_and_sources(tmp_path):
    result = build.run_build(demo.demo_config(str(tmp_path)))
    provenance = store.read_manifest(result.dataset_uri)["provenance"]
    assert provenance["config"]["publish"]["uri"] == str(tmp_path)
    assert provenance["source_files"] == [str(demo.REPO_ROOT / "data" / "demo" / "demo.jsonl")]
    assert len(provenance["source_fingerprint"]) == 64
    assert provenance["rank_by"] == "chrf"
    assert result.sources == 180 and result.lang_pairs == {"de-en": 90, "en-de": 90}


def test_demo_config_keeps_its_work_beside_another_store(tmp_path):
    config = demo.demo_config(str(tmp_path / "elsewhere"))
    assert config.work_dir == str(tmp_path / "elsewhere") + "-work"
    assert demo.demo_config().work_dir == str(demo.REPO_ROOT / ".cpo-data" / "work")
