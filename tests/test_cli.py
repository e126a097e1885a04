import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cpo_data import store
from cpo_data.testing import sample_triplets
from pipelines.cli import main
from tests.conftest import processes_with_env


@pytest.mark.slow
def test_demo_builds_through_the_flow_and_shows_the_version(tmp_path, capsys, prefect_server):
    """The demo ranks the two provided systems by chrF against the reference."""
    import sacrebleu

    assert main(["demo", "--store", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    manifest = store.read_manifest(str(tmp_path / "demo"))
    corpus = Path(__file__).parent.parent / "data" / "demo" / "demo.jsonl"
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    assert manifest["rows"] == len(rows)  # no two outputs tie on chrF in the demo corpus
    assert f"published {len(rows)} triplets" in out and "human labels" in out
    assert manifest["version"] in out and "[de-en]" in out and "pandas preview" in out
    # The guards' line: the demo's real outputs are all left alone.
    assert f"vetoed          0 of {2 * len(rows)} candidates by the guards\n" in out
    frame = store.read_triplets(str(tmp_path / "demo"))
    first = rows[0]
    chrf = {s: sacrebleu.sentence_chrf(first[s], [first["ref"]]).score
            for s in ("system_a", "system_b")}
    row = frame[frame["src"] == first["src"]].iloc[0]
    better = max(chrf, key=chrf.get)
    assert row["chosen"] == first[better] and row["chosen_system"] == better
    assert row["chosen_score"] == pytest.approx(chrf[better])
    assert set(frame["selected_by"]) == {"score"}

    # Then a short training run on that version, whose metrics move.
    run_dir = Path(f"{tmp_path}-runs") / manifest["version"]
    record = json.loads((run_dir / "run_manifest.json").read_text())
    assert record["dataset_version"] == manifest["version"] and record["steps"] == 120
    assert f"==> trained 120 steps (cpo, full) on {tmp_path / 'demo'}" in out
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in steps if "loss" in m]
    first, last = steps[:10], steps[-10:]
    mean = lambda ms, key: sum(m[key] for m in ms) / len(ms)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 1
    assert mean(last, "rewards/accuracies") > mean(first, "rewards/accuracies")
    assert "test set (trained): de-en rows 20" in out and "test set (base)" in out
    # It ends with what the numbers mean, the real recipe, and the report's path.
    assert "the wiring, not translation quality" in out and "configs/alma-r.yaml" in out
    report = Path(store.version_path(str(tmp_path / "demo"))) / "__attachments__/report.html"
    assert out.rstrip().splitlines()[-1] == f"report    {report}" and report.is_file()


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


@pytest.mark.slow
def test_console_script_runs_the_demo_and_leaves_no_server_behind(tmp_path):
    exe = shutil.which("cpo-data") or str(Path(__file__).parents[1] / ".venv/bin/cpo-data")
    home = tmp_path / "prefect-home"
    env = dict(os.environ, PREFECT_HOME=str(home))
    result = subprocess.run([exe, "demo", "--store", str(tmp_path / "store"), "--rows", "1"],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "pd.read_parquet(" in result.stdout and "==> trained 120 steps" in result.stdout
    assert "Error logging to API" not in result.stderr
    # Prefect's temporary server was started under this PREFECT_HOME; none may outlive us.
    assert processes_with_env(f"PREFECT_HOME={home}") == []


@pytest.mark.slow  # a Prefect server start
def test_a_flow_s_last_log_lines_reach_the_temporary_server_before_it_stops(tmp_path):
    """Run logs still queued when the block ends are sent while the server is up, not at
    exit against a closed port. A 60 s batch interval keeps the flow's line in the queue
    until then; the server's own database must hold it afterwards."""
    import sqlite3

    home = tmp_path / "prefect-home"
    script = textwrap.dedent("""
        from prefect import flow, get_run_logger
        from pipelines.cli import _prefect_server

        @flow
        def speak():
            get_run_logger().info("the flow's last line")

        with _prefect_server():
            speak()
    """)
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_LOGGING_TO_API_BATCH_INTERVAL="60")
    env.pop("PREFECT_API_URL", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "Error logging to API" not in result.stderr
    with sqlite3.connect(home / "prefect.db") as db:
        messages = [m for (m,) in db.execute("select message from log")]
    assert "the flow's last line" in messages


@pytest.mark.slow  # a second or two: a project load and Prefect's settings, per case
@pytest.mark.parametrize("user_setting, expected_wait", [
    ({}, "patient"),
    ({"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": 300}, 300),  # the user's choice stays
])
def test_flow_commands_give_a_new_prefect_database_time_to_migrate(
        monkeypatch, capsys, user_setting, expected_wait):
    import prefect.settings as ps

    from cpo_data.errors import UserError
    from pipelines import build, cli

    def report_the_wait(config):
        raise UserError(f"wait {ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()}")

    monkeypatch.setattr(build, "build_triplets", report_the_wait)
    config = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    updates = {getattr(ps, key): value for key, value in user_setting.items()}
    # No server of the module's flow tests either (their fixture sets PREFECT_API_URL).
    with ps.temporary_settings(updates=updates, restore_defaults={ps.PREFECT_API_URL}):
        assert main(["build", config]) == 2
    wait = cli.TEMPORARY_SERVER_WAIT_S if expected_wait == "patient" else expected_wait
    assert capsys.readouterr().err == f"error: wait {wait}\n"


def test_the_temporary_server_runs_without_analytics_unless_the_user_wants_them(monkeypatch):
    """Offline, Prefect's telemetry logs an ERROR on every run; a user's setting stays."""
    import prefect.settings as ps

    from pipelines import cli

    monkeypatch.delenv("PREFECT_SERVER_ANALYTICS_ENABLED", raising=False)  # the test setup's
    monkeypatch.delenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", raising=False)
    assert cli.temporary_server_settings(ps.Settings()) == {
        ps.PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: cli.TEMPORARY_SERVER_WAIT_S,
        ps.PREFECT_SERVER_ANALYTICS_ENABLED: False}
    monkeypatch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "true")
    assert ps.PREFECT_SERVER_ANALYTICS_ENABLED not in cli.temporary_server_settings(
        ps.Settings())


@pytest.mark.slow  # a second or two: Prefect's client and its health check
def test_a_saved_server_that_does_not_answer_is_one_line_before_any_work(monkeypatch, capsys):
    import prefect.settings as ps

    from pipelines import build

    def must_not_run(config):
        raise AssertionError("the flow started")

    monkeypatch.setattr(build, "build_triplets", must_not_run)
    config = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
    with ps.temporary_settings(updates={ps.PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert main(["build", config]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(
        "error: the Prefect server at PREFECT_API_URL=http://127.0.0.1:9/api does not answer")
    assert "prefect config unset PREFECT_API_URL" in err


def test_version_flag(capsys):
    from cpo_data import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out == f"cpo-data {__version__}\n"


def test_report_renders_older_versions_and_points_at_a_published_one(tmp_path, capsys):
    from cpo_data import report

    dataset = str(tmp_path / "mt")
    old = store.publish_triplets(sample_triplets(2), str(tmp_path), "mt")
    assert main(["report", dataset, "--version", old]) == 0
    page = Path(capsys.readouterr().out.split("report    ")[1].strip())
    assert page == Path(store.version_path(dataset, old)) / report.REPORT_FILE
    assert "<svg" in page.read_text()
    new = store.publish_triplets(sample_triplets(2, seed=1), str(tmp_path), "mt",
                                 attachments=report.attachment)
    listed = Path(store.version_path(dataset, new)) / report.REPORT_FILE
    before = listed.stat().st_mtime_ns
    assert main(["report", dataset]) == 0
    assert capsys.readouterr().out == f"report    {listed}\n"
    assert listed.stat().st_mtime_ns == before  # listed in the manifest: not rewritten


def test_push_passes_the_command_line_to_push_version(tmp_path, capsys, monkeypatch):
    from cpo_data import hub

    calls = []
    monkeypatch.setattr(hub, "push_version", lambda *a, **k: calls.append((a, k)) or "URL")
    assert main(["push", "s/mt", "org/pairs", "--version", "v1", "--private",
                 "--revision", "b"]) == 0
    assert calls == [(("s/mt", "org/pairs", "v1"), {"name": None, "private": True,
                                                    "revision": "b"})]
    assert capsys.readouterr().out.endswith("pushed    URL\n")


def test_report_without_a_dataset_is_the_demo_s(monkeypatch, capsys):
    from cpo_data import report
    from pipelines.demo import demo_config

    publish = demo_config().publish
    written = []
    monkeypatch.setattr(store, "read_manifest", lambda uri, version, name=None: {
        "version": "v1", "attachments": []})
    monkeypatch.setattr(report, "write_report",
                        lambda uri, version, name=None: written.append((uri, version)) or "P")
    assert main(["report"]) == 0
    assert written == [(store.dataset_uri(publish.uri, publish.name), "v1")]
    assert capsys.readouterr().out == "report    P\n"
