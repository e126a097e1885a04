"""A published version is a Hugging Face dataset folder: the card's configs, the three
`load_dataset` forms, the conversational format, attachments, and `push_version` (offline: the
Hub calls are replaced and what they would send is checked; the upload itself never runs)."""

import hashlib
import json
from pathlib import Path

import datasets
import pytest
import yaml

from cpo_data import card, schema, store
from cpo_data.config import ConfigError, PublishConfig
from cpo_data.testing import sample_dropped, sample_triplets

PROVENANCE = {"cpo_data_version": "0.1.0", "source_fingerprint": "fp-1234", "rank_by": "kiwi",
              "generators": ["gen-a@abc"], "scorers": ["kiwi@def"], "min_margin": 0.05,
              "vetoes": {"off_target": 2}}


def _publish(root, **kwargs):
    triplets = sample_triplets(3, pairs=("de-en", "en-de", "zh-en"))
    dropped = sample_dropped(["gone-1", "gone-2"], reason="within_noise")
    version = store.publish_triplets(triplets, str(root), "mt", PROVENANCE, dropped=dropped,
                                     **kwargs)
    return triplets, str(root / "mt" / version)


def _ids(table, pair=None):
    return sorted(r["id"] for r in table.to_pylist() if pair in (None, r["lang_pair"]))


def _front_matter(folder):
    """The card's front matter and prose; `.huggingface.yaml` (what `datasets` reads in the
    store) must hold the same front matter."""
    text = (Path(folder) / store.CARD_PATH).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    _, front, prose = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert yaml.safe_load((Path(folder) / store.REPO_YAML).read_text(encoding="utf-8")) == meta
    return meta, prose


def _stage(files, folder):
    """Write what an upload would send into `folder`, as a download of the repository."""
    for path, data in files.items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_bytes(data)
    return str(folder)


def test_the_three_load_forms_read_the_triplets_only(tmp_path):
    """With everything a version can hold beside the triplets (dropped rows, the conversational
    files, an attachment, the card, the manifest), each form reads exactly the right rows."""
    triplets, folder = _publish(tmp_path, conversational=True,
                                attachments=lambda *_: {"report.html": b"<html></html>"})
    everything = datasets.load_dataset(folder, split="train")
    assert sorted(everything["id"]) == _ids(triplets)
    one_pair = datasets.load_dataset(folder, "de-en", split="train")
    assert sorted(one_pair["id"]) == _ids(triplets, "de-en") and len(one_pair) == 3
    assert set(one_pair["lang_pair"]) == {"de-en"}
    plain = datasets.load_dataset("parquet", data_dir=folder, split="train")
    assert sorted(plain["id"]) == _ids(triplets)
    for loaded in (everything, one_pair, plain):
        assert loaded.features == datasets.Features.from_arrow_schema(schema.TRIPLETS)
    assert not (Path(folder) / store.CARD).exists()  # the card is kept under __attachments__/


def test_pandas_reads_the_version_folder_as_the_triplets(tmp_path):
    """pyarrow reads every file not starting with `.` or `_` as Parquet: with the card, the
    conversational and dropped rows and an attachment beside them, only the triplets are."""
    import pandas as pd

    triplets, folder = _publish(tmp_path, conversational=True,
                                attachments=lambda *_: {"report.html": b"<html></html>"})
    frame = pd.read_parquet(folder)
    assert list(frame.columns) == schema.TRIPLETS.names
    assert len(frame) == triplets.num_rows == 9
    assert sorted(frame["id"]) == _ids(triplets)


def test_the_card_declares_every_pair_and_the_schema_features(tmp_path):
    triplets, folder = _publish(tmp_path)
    meta, _ = _front_matter(folder)
    assert [c["config_name"] for c in meta["configs"]] == ["default", "de-en", "en-de", "zh-en"]
    assert meta["configs"][2]["data_files"] == [{"split": "train",
                                                 "path": ["en-de/part-00000.parquet"]}]
    assert meta["language"] == ["de", "en", "zh"]
    assert "license" not in meta and "translation" in meta["task_categories"]
    # The card's features are what `datasets` would infer from the schema, nested spans too:
    # `load_dataset` casts to the card's features, so a wrong type shows in what it returns.
    expected = datasets.Features.from_arrow_schema(schema.TRIPLETS)
    for config in ("default", "zh-en"):
        info = next(i for i in meta["dataset_info"] if i["config_name"] == config)
        assert datasets.Features._from_yaml_list(info["features"]) == expected
    loaded = datasets.load_dataset(folder, "zh-en", split="train")
    assert loaded.features == expected
    spans = loaded.features["chosen_scores"].feature["error_spans"].feature
    assert spans["start"].dtype == "int32" and spans["confidence"].dtype == "float64"
    assert sorted(loaded["id"]) == _ids(triplets, "zh-en")


def test_the_card_prose_comes_from_the_manifest(tmp_path):
    _, folder = _publish(tmp_path, license="cc-by-nc-sa-4.0")
    meta, text = _front_matter(folder)
    manifest = json.loads((Path(folder) / store.MANIFEST).read_text())
    assert meta["license"] == "cc-by-nc-sa-4.0" and "`cc-by-nc-sa-4.0`" in text
    assert manifest["license"] == "cc-by-nc-sa-4.0"
    assert "| `zh-en` | 3 |" in text and "| all (`default`) | 9 |" in text
    assert "| system_a | 9 | 0 |" in text and "| system_b | 0 | 9 |" in text
    for value in ("0.1.0", "fp-1234", "kiwi", "gen-a@abc", "kiwi@def", "0.05", "off_target: 2"):
        assert value in text
    assert "| `within_noise` | 2 |" in text
    assert f'version="{manifest["version"]}"' in text  # the loading snippet names it
    assert "`__attachments__/README.md`" in text and "`.huggingface.yaml`" in text


def test_a_card_without_a_licence_says_so_and_tolerates_a_bare_manifest(tmp_path):
    _, folder = _publish(tmp_path)
    _, text = _front_matter(folder)
    assert "Unknown" in text and "publish.license" in text
    bare = card.render_card({"name": "old", "files": [{"path": "de-en/part-00000.parquet"}]})
    meta = yaml.safe_load(bare.split("---\n")[1])
    assert "dataset_info" not in meta  # no schema version: the files' own types are used
    assert [c["config_name"] for c in meta["configs"]] == ["default", "de-en"]
    assert "no build provenance" in bare


def test_the_conversational_config_and_read_give_trl_messages(tmp_path):
    triplets, folder = _publish(tmp_path, conversational=True)
    dataset = str(Path(folder).parent)
    chat = datasets.load_dataset(folder, "conversational", split="train")
    assert chat.features == datasets.Features.from_arrow_schema(card.CONVERSATIONAL)
    frame = store.read_triplets(dataset, format="conversational")
    by_id = {r["id"]: r for r in triplets.to_pylist()}
    assert sorted(chat["id"]) == sorted(frame["id"]) == sorted(by_id)
    for row in chat:
        source = by_id[row["id"]]
        assert row["prompt"] == [{"role": "user", "content": source["prompt"]}]
        assert row["chosen"] == [{"role": "assistant", "content": source["chosen"]}]
        assert row["rejected"] == [{"role": "assistant", "content": source["rejected"]}]
        assert (row["src"], row["chosen_system"]) == (source["src"], source["chosen_system"])
    first = frame.iloc[0]
    assert list(first["prompt"]) == [{"role": "user", "content": by_id[first["id"]]["prompt"]}]
    assert list(frame.columns) == schema.TRIPLETS.names
    # The default config and the pair configs do not pick the conversational files up.
    assert len(datasets.load_dataset(folder, split="train")) == 9
    manifest = store.read_manifest(dataset)
    for entry in manifest["conversational_files"]:
        data = (Path(folder) / entry["path"]).read_bytes()
        assert entry["path"].startswith("__conversational__/")
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and entry["rows"] == 3
    with pytest.raises(store.StoreError, match="format 'chat'"):
        store.read_triplets(dataset, format="chat")


def test_without_the_option_there_is_no_conversational_config(tmp_path):
    _, folder = _publish(tmp_path)
    meta, _ = _front_matter(folder)
    assert "conversational" not in [c["config_name"] for c in meta["configs"]]
    assert not (Path(folder) / store.CONVERSATIONAL_DIR).exists()
    assert store.read_manifest(str(Path(folder).parent))["conversational_files"] == []
    # The read converts any version, published with the option or not.
    frame = store.read_triplets(str(Path(folder).parent), format="conversational")
    assert list(frame["chosen"].iloc[0])[0]["role"] == "assistant"


def test_attachments_are_written_before_the_manifest_and_listed_with_the_card(tmp_path):
    seen = {}

    def hook(manifest, triplets, dropped):
        seen.update(manifest=manifest, triplets=triplets.read().num_rows,
                    dropped=sum(b.num_rows for b in dropped.batches(["reason"], 1)))
        manifest["rows"] = -1  # a hook cannot change what is written
        return {"report.html": b"<p>report</p>", "notes.txt": bytearray(b"n")}

    _, folder = _publish(tmp_path, attachments=hook)
    manifest = json.loads((Path(folder) / store.MANIFEST).read_text())
    assert "attachments" not in seen["manifest"] and seen["manifest"]["files"]
    assert seen["manifest"]["version"] == manifest["version"]
    assert (seen["triplets"], seen["dropped"], manifest["rows"]) == (9, 2, 9)
    assert [e["path"] for e in manifest["attachments"]] == [
        "__attachments__/README.md", ".huggingface.yaml", "__attachments__/report.html",
        "__attachments__/notes.txt"]
    for entry in manifest["attachments"]:
        data = (Path(folder) / entry["path"]).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (entry["bytes"], entry["sha256"])
    assert (Path(folder) / "__attachments__" / "report.html").read_bytes() == b"<p>report</p>"
    text = (Path(folder) / store.CARD_PATH).read_text()
    assert "`__attachments__/report.html`" in text
    # A pure function of the manifest: rendered again from the final one (which lists the card
    # and `.huggingface.yaml` too), it is the same card.
    assert card.render_card(manifest) == text


@pytest.mark.parametrize("returned, message", [
    ({"a/b.html": b""}, "plain file name"),
    ({".hidden": b""}, "plain file name"),
    ({"_x.json": b""}, "plain file name"),
    ({"README.md": b""}, "collide"),
    ({"de-en": b""}, "collide"),
    ({"more.parquet": b""}, "collide"),
    ({"r.html": "text"}, "expected bytes"),
    (["r.html"], "expected a mapping"),
])
def test_bad_attachments_are_refused_and_publish_nothing(tmp_path, returned, message):
    with pytest.raises(store.StoreError, match=message):
        _publish(tmp_path, attachments=lambda *_: returned)
    assert store.list_versions(str(tmp_path / "mt")) == []
    # The temporary folder is gone (the lock file stays: it holds no lock once closed).
    assert [p.name for p in (tmp_path / "mt").iterdir()] == [store.locks.LOCK_FILE]


def test_publish_config_takes_a_hub_licence_id():
    assert PublishConfig(uri="s", name="d").license is None
    assert not PublishConfig(uri="s", name="d").conversational
    assert PublishConfig(uri="s", name="d", license="cc-by-nc-sa-4.0").license == "cc-by-nc-sa-4.0"
    for bad in ("CC BY-NC", "", "mit\n"):
        with pytest.raises(ConfigError, match="license"):
            PublishConfig(uri="s", name="d", license=bad)


# ---- push (offline: the Hub calls are replaced; the upload itself is not exercised) ----------


@pytest.fixture
def hub(monkeypatch):
    """Records the Hub calls `push_version` makes, and what the upload folder holds then."""
    from huggingface_hub import HfApi

    calls = {"create_repo": [], "create_branch": [], "upload_folder": []}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"].append({"repo_id": repo_id, **kwargs})

    def create_branch(self, repo_id, **kwargs):
        calls["create_branch"].append({"repo_id": repo_id, **kwargs})

    def upload_folder(self, **kwargs):
        folder = Path(kwargs["folder_path"])
        files = {p.relative_to(folder).as_posix(): p.read_bytes()
                 for p in sorted(folder.rglob("*")) if p.is_file()}
        calls["upload_folder"].append({**kwargs, "files": files})
        return f"https://huggingface.co/datasets/{kwargs['repo_id']}/commit/abc"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_uploads_every_listed_file_verified(tmp_path, hub):
    from cpo_data.hub import push_version

    _, folder = _publish(tmp_path, conversational=True,
                         attachments=lambda *_: {"report.html": b"<p/>"})
    manifest = json.loads((Path(folder) / store.MANIFEST).read_text())
    url = push_version(str(tmp_path), "me/mt", name="mt", private=True)
    assert url == "https://huggingface.co/datasets/me/mt/commit/abc"
    assert hub["create_repo"] == [{"repo_id": "me/mt", "repo_type": "dataset", "private": True,
                                   "exist_ok": True}]
    assert hub["create_branch"] == []
    (upload,) = hub["upload_folder"]
    assert upload["repo_id"] == "me/mt" and upload["repo_type"] == "dataset"
    assert manifest["version"] in upload["commit_message"] and upload["revision"] is None
    assert "*.parquet" in upload["delete_patterns"]
    # An older push's configs would otherwise stay and override this version's card.
    assert store.REPO_YAML in upload["delete_patterns"]
    on_disk = {p.relative_to(folder).as_posix(): p.read_bytes()
               for p in Path(folder).rglob("*") if p.is_file()}
    assert "README.md" not in on_disk
    # Every file of the version (data, conversational, dropped, card, front matter, attachment,
    # manifest) and the card once more at the root, where the Hub reads it.
    assert upload["files"] == {**on_disk, "README.md": on_disk["__attachments__/README.md"]}
    assert {".manifest.json", ".huggingface.yaml", "__attachments__/README.md",
            "__dropped__/part-00000.parquet", "__attachments__/report.html",
            "__conversational__/de-en/part-00000.parquet"} <= set(upload["files"])
    assert upload["files"]["README.md"].startswith(b"---\n")
    assert {e["path"] for key in ("files", "conversational_files", "dropped_files", "attachments")
            for e in manifest[key]} | {".manifest.json", "README.md"} == set(upload["files"])
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up
    # A download of the repository loads in each form.
    staged = _stage(upload["files"], tmp_path / "staged")
    assert len(datasets.load_dataset(staged, split="train")) == 9
    assert len(datasets.load_dataset(staged, "zh-en", split="train")) == 3
    assert len(datasets.load_dataset(staged, "conversational", split="train")) == 9


def test_push_refuses_a_changed_file_before_reaching_the_hub(tmp_path, hub):
    from cpo_data.hub import push_version

    _, folder = _publish(tmp_path)
    (Path(folder) / store.CARD_PATH).write_text("edited by hand")
    with pytest.raises(store.StoreError, match=r"/__attachments__/README\.md: sha256 mismatch"):
        push_version(str(tmp_path / "mt"), "me/mt")
    assert hub["create_repo"] == [] and hub["upload_folder"] == []
    push_version(str(tmp_path / "mt"), "me/mt", verify=False, revision="v1")
    assert hub["create_branch"] == [{"repo_id": "me/mt", "branch": "v1",
                                     "repo_type": "dataset", "exist_ok": True}]
    assert hub["upload_folder"][0]["revision"] == "v1"
    files = hub["upload_folder"][0]["files"]
    assert files["README.md"] == files["__attachments__/README.md"] == b"edited by hand"


def test_push_from_an_object_store_downloads_first(tmp_path, hub):
    import fsspec

    from cpo_data.hub import push_version

    try:
        version = store.publish_triplets(sample_triplets(2), "memory://bucket/store", "mt", {})
        push_version("memory://bucket/store/mt", "me/mt")
        files = hub["upload_folder"][0]["files"]
        assert sorted(files) == [".huggingface.yaml", ".manifest.json", "README.md",
                                 "__attachments__/README.md", "de-en/part-00000.parquet",
                                 "en-de/part-00000.parquet"]
        assert files["README.md"] == files["__attachments__/README.md"]
        assert json.loads(files[".manifest.json"])["version"] == version
    finally:
        fsspec.filesystem("memory").rm("/bucket", recursive=True)


def test_push_of_a_version_from_before_cards_gets_one(tmp_path, hub):
    """A version with `_manifest.json` and no card: the repository still gets a card, and the
    manifest under its current name, so the upload loads like a new version."""
    import shutil

    from cpo_data.hub import push_version

    triplets, folder = _publish(tmp_path)
    old = json.loads((Path(folder) / store.MANIFEST).read_text())
    for key in ("attachments", "systems", "license", "conversational_files"):  # not kept then
        del old[key]
    (Path(folder) / store.MANIFEST).unlink()
    (Path(folder) / store.REPO_YAML).unlink()
    shutil.rmtree(Path(folder) / store.ATTACHMENTS_DIR)
    (Path(folder) / store.LEGACY_MANIFEST).write_text(json.dumps(old))
    assert store.read_manifest(str(tmp_path / "mt"))["version"] == old["version"]
    push_version(str(tmp_path / "mt"), "me/mt")
    files = hub["upload_folder"][0]["files"]
    assert store.LEGACY_MANIFEST not in files and ".manifest.json" in files
    assert sorted(files) == [".manifest.json", "README.md", "__dropped__/part-00000.parquet",
                             "de-en/part-00000.parquet", "en-de/part-00000.parquet",
                             "zh-en/part-00000.parquet"]
    assert files["README.md"].decode() == card.render_card(old)
    staged = _stage(files, tmp_path / "staged")
    assert sorted(datasets.load_dataset(staged, "en-de", split="train")["id"]) == _ids(
        triplets, "en-de")
    assert sorted(datasets.load_dataset(staged, split="train")["id"]) == _ids(triplets)


@pytest.mark.slow
def test_trl_cpo_trains_on_the_default_and_conversational_configs(tmp_path):
    """The README's TRL snippet with a tiny local model: one CPO step on each config (the
    conversational one through the tokenizer's chat template)."""
    import warnings

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpo_data.testing import build_tiny_causal_lm

    with warnings.catch_warnings():  # "You are importing from 'trl.experimental'"
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer

    _, folder = _publish(tmp_path, conversational=True)
    model_id = build_tiny_causal_lm(tmp_path / "model", chat_template=True)
    for config in ("default", "conversational"):
        train = datasets.load_dataset(folder, config, split="train")
        args = CPOConfig(output_dir=str(tmp_path / config), max_steps=1, max_length=128,
                         per_device_train_batch_size=2, report_to=[], use_cpu=True, bf16=False,
                         save_strategy="no", disable_tqdm=True, remove_unused_columns=False)
        trainer = CPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_id), args=args,
                             train_dataset=train,
                             processing_class=AutoTokenizer.from_pretrained(model_id))
        templated = trainer.train_dataset[0]["prompt"].startswith("<s>user: ")
        assert templated == (config == "conversational")
        assert trainer.train().training_loss > 0
