"""The training run on a published version: errors on bad datasets, and the Prefect flow."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cpo_data import store
from cpo_data.config import ScorerConfig, SourcesConfig
from cpo_data.schema import SchemaError
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet, sample_triplets
from tests.conftest import train_config, write_jsonl
from training.config import EvalConfig, TrainConfig
from training.loop import TrainingError
from training.run import RUN_MANIFEST, load_dataset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("model") / "llama"))


def publish(folder: Path) -> tuple[str, str]:
    uri = str(folder / "store")
    version = store.publish_triplets(sample_triplets(rows_per_pair=5), uri, "mt",
                                     provenance={"source_fingerprint": "f1" * 32})
    return store.dataset_uri(uri, "mt"), version


def version_folder(dataset: str, version: str) -> Path:
    return Path(dataset) / version


def test_a_missing_dataset_or_version_is_named(tmp_path, model_dir):
    config = TrainConfig(model=model_dir, dataset=str(tmp_path / "store" / "mt"))
    with pytest.raises(store.StoreError, match=r"store/mt: no such dataset"):
        load_dataset(config)
    dataset, version = publish(tmp_path)
    with pytest.raises(store.StoreError, match=rf"mt: no version 'nope' \(newest: {version}\)"):
        load_dataset(TrainConfig(model=model_dir, dataset=dataset), "nope")


def test_a_changed_file_or_schema_fails_validation(tmp_path, model_dir):
    dataset, version = publish(tmp_path)
    config = TrainConfig(model=model_dir, dataset=dataset)
    manifest, rows = load_dataset(config)
    assert manifest["version"] == version and len(rows) == 10
    part = version_folder(dataset, version) / "de-en" / "part-00000.parquet"
    table = pq.read_table(part)
    pq.write_table(table.slice(0, 2), part)
    with pytest.raises(store.StoreError, match=r"de-en/part-00000\.parquet: \d+ bytes, the "
                                               r"manifest says \d+"):
        load_dataset(config)
    # A file the manifest vouches for, but without the column training reads.
    pq.write_table(table.drop_columns(["chosen"]), part)
    manifest_path = version_folder(dataset, version) / store.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["files"]:
        if entry["path"] == "de-en/part-00000.parquet":
            entry["sha256"] = hashlib.sha256(part.read_bytes()).hexdigest()
            entry["bytes"] = part.stat().st_size
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match=r"de-en/part-00000\.parquet.*chosen"):
        load_dataset(config)


def test_an_empty_version_is_refused(tmp_path, model_dir):
    dataset, version = publish(tmp_path)
    manifest_path = version_folder(dataset, version) / store.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest.update(files=[], rows=0)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(TrainingError, match=rf"mt version {version}: has no triplets"):
        load_dataset(TrainConfig(model=model_dir, dataset=dataset))


def test_a_pair_with_an_empty_completion_is_left_out_and_recorded(tmp_path, model_dir):
    import pyarrow as pa

    from training.run import run_training

    table = sample_triplets(rows_per_pair=3)
    rows = table.to_pylist()
    rows[1]["rejected"] = ""
    uri = str(tmp_path / "store")
    store.publish_triplets(pa.Table.from_pylist(rows, schema=table.schema), uri, "mt",
                           provenance={"source_fingerprint": "f1" * 32})
    config = train_config(model=model_dir, dataset=store.dataset_uri(uri, "mt"),
                          output_dir=str(tmp_path / "runs"), max_steps=1, batch_size=2)
    record = run_training(config, progress=False)
    assert record["left_out"] == {"empty_completion": 1}
    note, = (n for n in record["notes"] if "left out" in n)
    assert rows[1]["id"] in note
    on_disk = json.loads(next((tmp_path / "runs").glob(f"*/{RUN_MANIFEST}")).read_text())
    assert on_disk["left_out"] == record["left_out"] and on_disk["notes"] == record["notes"]


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_flow_trains_evaluates_and_records_the_version(tmp_path, model_dir, rows, events,
                                                       capsys):
    import comet
    import sacrebleu
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from pipelines.train import COMPLETED_EVENT, train_cpo

    dataset, first = publish(tmp_path)
    second = store.publish_triplets(sample_triplets(rows_per_pair=6), str(tmp_path / "store"),
                                    "mt", provenance={"source_fingerprint": "f2" * 32})
    test_set = write_jsonl(tmp_path / "test.jsonl", rows)
    kiwi = str(build_tiny_comet(tmp_path / "kiwi"))
    config = train_config(
        model=model_dir, dataset=dataset, output_dir=str(tmp_path / "runs"), max_steps=3,
        batch_size=2, eval=EvalConfig(
            held_out=2, test_set=SourcesConfig(path=str(test_set), src_lang_column="src_lang",
                                               tgt_lang_column="tgt_lang", ref_column="ref"),
            max_new_tokens=6, compare_base=True,
            comet=ScorerConfig(name="kiwi", model=kiwi, dtype="float64")))

    record = train_cpo(config)  # latest
    assert record["dataset_version"] == second and record["dataset_rows"] == 12
    assert record["train_rows"] == 10 and record["held_out_rows"] == 2
    run_dir = tmp_path / "runs" / second
    assert json.loads((run_dir / RUN_MANIFEST).read_text()) == record
    assert record["model_dir"] == str(run_dir / "final")
    assert record["config"]["schedule"]["max_steps"] == 3 and record["config"]["dataset"] == dataset
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    assert set(record["translation"]) == {"trained", "base"}
    for scores in record["translation"].values():
        assert {pair: s["rows"] for pair, s in scores.items()} == {"de-en": 2, "en-de": 1}
    # The scores are sacrebleu's and COMET's own numbers on the saved translations.
    lines = [json.loads(x) for x in (run_dir / "test_translations.jsonl").read_text(
        encoding="utf-8").splitlines()]
    assert [x["src"] for x in lines] == [r["src"] for r in rows]
    # float64 on both sides: other batches, other summation order, n * u near 1e-12 (see
    # tests/test_score.py); at float32 the difference would depend on the CPU's kernels.
    kiwi_model = comet.load_from_checkpoint(kiwi, local_files_only=True).double()
    for name in ("trained", "base"):
        for pair, scores in record["translation"][name].items():
            mine = [x for x in lines if x["lang_pair"] == pair]
            hypotheses, references = [x[name] for x in mine], [[x["ref"] for x in mine]]
            assert scores["bleu"] == sacrebleu.corpus_bleu(hypotheses, references).score
            assert scores["chrf"] == sacrebleu.corpus_chrf(hypotheses, references).score
            theirs = kiwi_model.predict([{"src": x["src"], "mt": x[name]} for x in mine],
                                        gpus=0, progress_bar=False).scores
            assert scores["kiwi"] == pytest.approx(sum(theirs) / len(theirs), abs=1e-12)

    older = train_cpo(config, version=first)  # a named version trains in its own folder
    assert older["dataset_version"] == first and older["dataset_rows"] == 10
    assert (tmp_path / "runs" / first / "final" / "adapter_model.safetensors").exists()

    # Lineage both ways: from the model to its dataset version, from a version to its runs.
    from pipelines.cli import main

    (run,) = store.list_runs(dataset, second)
    assert run["model_dir"] == record["model_dir"] and run["steps"] == 3
    assert [r["model_dir"] for r in store.list_runs(dataset, first)] == [older["model_dir"]]
    capsys.readouterr()
    assert main(["inspect", record["model_dir"]]) == 0
    out = capsys.readouterr().out
    assert f"dataset   {dataset} version {second} (12 triplets)" in out
    assert f"sources   fingerprint {'f2' * 8}" in out
    assert record["source_fingerprint"] == "f2" * 32
    assert main(["inspect", dataset, "--version", second, "--rows", "0"]) == 0
    out = capsys.readouterr().out
    assert "trained   1 run(s) on this version:" in out and record["model_dir"] in out

    completed = [e for e in events() if e.event == COMPLETED_EVENT]
    assert [e.payload["version"] for e in completed] == [second, first]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mt-training"])),
            limit=1)
    metrics = {row["metric"]: row["value"] for row in json.loads(artifact.data)}
    assert "loss" in metrics and "eval/rewards/accuracies" in metrics


def test_cli_train_reads_the_train_section(tmp_path, model_dir, capsys, monkeypatch):
    """`cpo-data train CONFIG` refuses bad input before Prefect starts, with exit code 2."""
    from pipelines.cli import main

    config = tmp_path / "config.yaml"
    config.write_text(f"train:\n  model: {model_dir}\n  dataset: {tmp_path / 'none'}\n"
                      "  loss: orpo\n  loss_type: hinge\n")
    assert main(["train", str(config)]) == 2
    assert "train.loss_type: 'hinge' is a cpo loss type" in capsys.readouterr().err
    flow_started = []
    monkeypatch.setattr("pipelines.train.train_cpo", lambda *a: flow_started.append(a))
    config.write_text(f"train:\n  model: {model_dir}\n  dataset: {tmp_path / 'none'}\n")
    assert main(["train", str(config)]) == 2
    assert "none: no such dataset" in capsys.readouterr().err
    assert flow_started == []
