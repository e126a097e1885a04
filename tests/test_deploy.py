"""Deployments: the `deploy` section, `cpo-data serve`'s refusal without a server, and, against a
real `prefect server start`, a served build whose published version starts the training."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cpo_data import store
from cpo_data.config import ConfigError, GuardsConfig
from cpo_data.testing import build_tiny_causal_lm
from pipelines import deploy
from pipelines.demo import REPO_ROOT
from tests.conftest import processes_with_env

DEMO_ROWS = [json.loads(line) for line in
             (REPO_ROOT / "data/demo/demo.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("models") / "causal"))


def write_config(folder: Path, model: str, rows: int = 16, **sections) -> Path:
    """A build (tiny Llama candidates, chrF ranking), a short LoRA run, and `sections`."""
    (folder / "sources.jsonl").write_text("".join(
        json.dumps(r, ensure_ascii=False) + "\n" for r in DEMO_ROWS[:rows]), encoding="utf-8")
    config = {
        "sources": [{"path": "sources.jsonl", "src_lang_column": "src_lang",
                     "tgt_lang_column": "tgt_lang"}],
        "generate": {"include_reference": False, "models": [
            {"name": "tiny", "model": model, "max_new_tokens": 6, "strategy": "sample",
             "num_candidates": 2, "seed": 1}]},
        "score": {"scorers": [{"name": "chrf", "kind": "chrf"}]},
        # The only candidates are a random-weight model's samples, which the guards rightly
        # veto (no language, no length): this test is about serving, so they are off.
        "guards": {guard.name: {"enabled": False} for guard in dataclasses.fields(GuardsConfig)},
        "publish": {"uri": "store", "name": "served"},
        "work_dir": "work",
        "shard_size": 8,
        "train": {"model": model, "output_dir": "runs", "schedule": {"max_steps": 2},
                  "batch_size": 2,
                  "eval": {"held_out": 0}},
    }
    config.update(sections)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def test_the_deploy_section_gives_a_scheduled_build_and_a_triggered_training(tmp_path, model):
    from pipelines.build import PUBLISHED_EVENT

    path = write_config(tmp_path, model, deploy={"schedule": {"interval": 3600}})
    build, train = deploy.deployments(path)
    assert (build.name, train.name) == ("served", "served")
    assert [s.schedule.interval.total_seconds() for s in build.schedules] == [3600]
    assert build.parameters == {"config": str(path)} and not train.schedules
    for served in (build, train):  # one run at a time; the next one waits
        assert served.concurrency_limit == 1
        assert served.concurrency_options.collision_strategy == "ENQUEUE"
    (trigger,) = train.triggers
    assert trigger.expect == {PUBLISHED_EVENT}
    assert trigger.match.root == {"prefect.resource.id": "cpo-data.dataset.served",
                                  "cpo-data.dataset-uri": str(tmp_path / "store" / "served")}
    assert trigger.parameters == {"config": str(path), "version": "{{ event.payload.version }}"}

    path = write_config(tmp_path, model, deploy={"train_on_publish": False})
    (build,) = deploy.deployments(path)
    assert not build.schedules


@pytest.mark.parametrize(("section", "message"), [
    ({"schedule": {"cron": "0 3 * * *", "interval": 60}},
     r"deploy\.schedule\.cron: give either cron or interval"),
    ({"schedule": {}}, r"deploy\.schedule\.cron: give either cron or interval"),
    ({"schedule": {"cron": "every day"}}, r"deploy\.schedule\.cron: Invalid cron string"),
    ({"schedule": {"cron": "0 3 * * *", "timezone": "Mars/Olympus"}},
     r"deploy\.schedule\.timezone: Invalid timezone: \"Mars/Olympus\""),
    ({"schedule": {"interval": 0}}, r"deploy\.schedule\.interval: must be at least 1"),
    ({"trigger": True}, r"deploy\.trigger: unknown key"),
])
def test_a_bad_deploy_section_is_named(tmp_path, model, section, message):
    path = write_config(tmp_path, model, deploy=section)
    with pytest.raises(ConfigError, match=rf"config\.yaml: {message}"):
        deploy.deployments(path)


def test_training_on_another_dataset_cannot_be_triggered_by_this_build(tmp_path, model):
    path = write_config(tmp_path, model, train={"model": model, "dataset": str(tmp_path / "x")})
    with pytest.raises(ConfigError, match=r"train\.dataset: .*x is not the dataset this build "
                       r"publishes"):
        deploy.deployments(path)


@pytest.mark.slow  # several seconds: Prefect's client and the deployment's config
def test_serve_refuses_to_start_without_a_server(tmp_path, model, monkeypatch, capsys):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipelines.cli import main

    served = []
    monkeypatch.setattr("prefect.serve", lambda *d: served.append(d))
    path = write_config(tmp_path, model)
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert main(["serve", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no Prefect server is configured (PREFECT_API_URL is not set)" in err
    assert "prefect server start" in err
    with temporary_settings({PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        assert main(["serve", str(path)]) == 2
    assert "does not answer" in capsys.readouterr().err
    assert served == []


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the process group (so Prefect shuts down its children), SIGKILL if slow."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_for(condition, what: str, timeout: float, *processes: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for process in processes:
            assert process.poll() is None, f"{process.args[:2]} ended while waiting for {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.5)


@contextlib.contextmanager
def started(args: list[str], env: dict, log: Path):
    with log.open("w") as out:
        process = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    try:
        yield process
    except BaseException:
        print(f"--- {log.name}\n{log.read_text()[-4000:]}")
        raise
    finally:
        stop(process)


def _answers(url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.slow
def test_a_served_build_publishes_and_its_event_trains_on_that_version(tmp_path, model):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    home = tmp_path / "prefect-home"
    url = f"http://127.0.0.1:{free_port()}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", OMP_NUM_THREADS="1",
               # Upcoming runs of a new schedule appear within a second, not five.
               PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS="1")
    port = url.split(":")[2].split("/")[0]
    prefect = shutil.which("prefect") or str(REPO_ROOT / ".venv/bin/prefect")
    cpo_data = shutil.which("cpo-data") or str(REPO_ROOT / ".venv/bin/cpo-data")
    path = write_config(tmp_path, model, deploy={"schedule": {"cron": "0 3 * * *",
                                                              "timezone": "UTC"}})

    with started([prefect, "server", "start", "--host", "127.0.0.1", "--port", port], env,
                 tmp_path / "server.log") as server:
        wait_for(lambda: _answers(url), "server", 120, server)
        with started([cpo_data, "serve", str(path)], dict(env, PREFECT_API_URL=url),
                     tmp_path / "serve.log") as served, \
                temporary_settings({PREFECT_API_URL: url}), \
                get_client(sync_client=True) as client:

            def deployment(name: str):
                with contextlib.suppress(ObjectNotFound):
                    return client.read_deployment_by_name(name)

            def runs_of(deployment_id):
                return client.read_flow_runs(deployment_filter=DeploymentFilter(
                    id=DeploymentFilterId(any_=[deployment_id])))

            build = wait_for(lambda: deployment("cpo-data-build/served"), "build deployment",
                             120, server, served)
            train = wait_for(lambda: deployment("cpo-data-train/served"), "train deployment",
                             60, server, served)
            # The schedule lives in the server, which plans the coming runs at 03:00 UTC.
            assert [s.schedule.cron for s in build.schedules] == ["0 3 * * *"]
            planned = wait_for(lambda: runs_of(build.id), "scheduled build run", 60, server)
            assert {(r.expected_start_time.hour, r.expected_start_time.minute, r.state_name)
                    for r in planned} == {(3, 0, "Scheduled")}
            assert runs_of(train.id) == []  # nothing published yet

            started_build = client.create_flow_run_from_deployment(build.id)
            done = wait_for(lambda: [r for r in runs_of(train.id) if r.state.is_final()],
                            "finished training run", 300, server, served)
            build_run = client.read_flow_run(started_build.id)
            assert build_run.state.is_completed(), build_run.state
            (published,) = store.list_versions(str(tmp_path / "store"), name="served")
            version = published["version"]
            (training,) = done
            assert training.state.is_completed(), training.state
            assert training.parameters == {"config": str(path), "version": version}
            record = json.loads((tmp_path / "runs" / version / "run_manifest.json").read_text())
            assert record["dataset_version"] == version and record["steps"] == 2
    # Server, runner and every flow run it started have stopped.
    assert processes_with_env(f"PREFECT_HOME={home}") == []


@pytest.mark.parametrize("name", ["demo.yaml", "alma-r.yaml"])
def test_the_shipped_configs_schedule_their_build_and_train_on_publish(name):
    from pipelines.project import load_project

    config = load_project(REPO_ROOT / "configs" / name).deploy
    assert config.schedule is not None and config.schedule.cron and config.train_on_publish
