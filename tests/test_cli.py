import json
import shutil
import subprocess
from pathlib import Path

from cpo_data import store
from cpo_data.cli import main
from cpo_data.testing import sample_triplets


def test_demo_publishes_the_labelled_corpus_and_shows_it(tmp_path, capsys):
    assert main(["demo", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    manifest = store.read_manifest(str(tmp_path / "demo"))
    corpus = Path(__file__).parent.parent / "data" / "demo" / "demo.jsonl"
    labelled = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert manifest["rows"] == len(labelled)  # every row carries a label, none identical
    assert f"published {len(labelled)} triplets" in out
    assert manifest["version"] in out and "[de-en]" in out and "[en-de]" in out
    frame = store.read_triplets(str(tmp_path / "demo"))
    first = labelled[0]
    row = frame[frame["src"] == first["src"]].iloc[0]
    better = "system_a" if first["delta"] > 0 else "system_b"
    assert row["chosen"] == first[better] and row["chosen_system"] == better
    assert manifest["provenance"]["source_fingerprint"]


def test_versions_and_inspect(tmp_path, capsys):
    for seed in range(2):
        store.publish_triplets(sample_triplets(2, seed=seed), str(tmp_path), "mt", {})
    versions = store.list_versions(str(tmp_path / "mt"))
    assert main(["versions", str(tmp_path), "--name", "mt"]) == 0
    out = capsys.readouterr().out
    assert "2 version(s)" in out and all(m["version"] in out for m in versions)
    first = versions[0]["version"]
    assert main(["inspect", str(tmp_path / "mt"), "--version", first, "--rows", "1"]) == 0
    out = capsys.readouterr().out
    assert f"version   {first}" in out and "de-en 2, en-de 2" in out
    assert "source 0-de-en-0" in out and "source 1-" not in out


def test_errors_are_one_clear_line_and_exit_2(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such dataset" in err
    (tmp_path / "file").write_text("x")
    assert main(["versions", str(tmp_path / "file")]) == 2
    assert "store path is a file" in capsys.readouterr().err


def test_console_script_is_installed(tmp_path):
    exe = shutil.which("cpo-data") or str(Path(__file__).parents[1] / ".venv/bin/cpo-data")
    result = subprocess.run([exe, "demo", "--store", str(tmp_path), "--rows", "1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pd.read_parquet(" in result.stdout
