"""Scale-out: the build's shards on a Dask cluster, models kept loaded per process, finished
shards on storage every worker reaches.

The flow tests share one Prefect test harness (module scope); the unit tests above them need
neither Prefect nor Dask workers.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cpo_data import build, store
from cpo_data.config import ConfigError, RunnerConfig, load_config
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet
from tests.conftest import processes_with_env
from tests.test_build_flow import DEMO_ROWS, write_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"causal": str(build_tiny_causal_lm(root / "causal")),
            "kiwi": str(build_tiny_comet(root / "kiwi", "kiwi"))}


def _mark_new_processes(monkeypatch) -> str:
    """An environment entry that every process started from now on inherits (Dask's workers
    and nannies), so that none may be left afterwards. multiprocessing's resource tracker
    lives as long as this process, by design: it is started before, and so is not marked."""
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()
    marker = uuid.uuid4().hex
    monkeypatch.setenv("CPO_DATA_TEST_CLUSTER", marker)
    return f"CPO_DATA_TEST_CLUSTER={marker}"


def _gone(marker: str, wait_s: float = 10) -> bool:
    """No process holds `marker` in its environment (allowing `wait_s` to exit)."""
    deadline = time.monotonic() + wait_s
    while processes_with_env(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _published(folder) -> list[dict]:
    """The latest version's triplets, in a stable order (version ids and times are not rows)."""
    table = store.read_triplets_table(str(folder / "store"), name="flowtest", verify=True)
    return table.sort_by([("id", "ascending")]).to_pylist()


# The runner section of the config.

def test_the_default_runner_is_threads_and_a_dask_section_loads(tmp_path, models):
    assert load_config(write_config(tmp_path, models, DEMO_ROWS[:2])).runner == RunnerConfig()
    config = load_config(write_config(tmp_path, models, DEMO_ROWS[:2],
                                      runner={"kind": "dask", "workers": 2}))
    assert config.runner == RunnerConfig(kind="dask", address=None, workers=2)
    assert config.runner.dashboard == "127.0.0.1:8787"  # this machine only, by default
    for dashboard in (None, "0.0.0.0:8788", "[::1]:8787"):
        config = load_config(write_config(tmp_path, models, DEMO_ROWS[:2],
                                          runner={"kind": "dask", "dashboard": dashboard}))
        assert config.runner.dashboard == dashboard


@pytest.mark.parametrize(("runner", "message"), [
    ({"kind": "spark"}, "runner.kind: 'spark' is not one of threads, dask"),
    ({"address": "tcp://h:8786"}, "runner.address: only applies with kind: dask"),
    ({"workers": 2}, "runner.workers: only applies with kind: dask"),
    ({"kind": "dask", "workers": 0}, "runner.workers: must be at least 1"),
    ({"kind": "dask", "address": "tcp://h:8786", "workers": 2}, "runner.workers: sizes a local"),
    ({"kind": "dask", "address": " "}, "runner.address: name a scheduler"),
    ({"kind": "dask", "workers": "two"}, "runner.workers: expected int"),
    # Dask reads ":8787" as every interface: opening the dashboard is written out.
    ({"kind": "dask", "dashboard": ":8787"}, "runner.dashboard: ':8787' is not HOST:PORT"),
    ({"kind": "dask", "dashboard": "127.0.0.1"}, "runner.dashboard: '127.0.0.1' is not HOST"),
    ({"kind": "dask", "dashboard": "127.0.0.1:87870"}, "runner.dashboard: '127.0.0.1:87870'"),
    ({"kind": "dask", "dashboard": 8787}, "runner.dashboard: expected str"),
])
def test_a_wrong_runner_section_names_its_key(tmp_path, models, runner, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(write_config(tmp_path, models, DEMO_ROWS[:2], runner=runner))


def test_dask_refuses_a_work_dir_that_only_one_process_sees(tmp_path, models):
    with pytest.raises(ConfigError, match="work_dir: memory:// lives in one process"):
        load_config(write_config(tmp_path, models, DEMO_ROWS[:2], runner={"kind": "dask"},
                                 work_dir="memory://bucket/work"))


# One GPU per worker (the mapping; no GPU here to run it on).

def test_visible_gpus_follow_cuda_visible_devices_else_the_device_count():
    from pipelines.dask_runner import visible_gpus

    def no_count() -> int:
        raise AssertionError("counted although CUDA_VISIBLE_DEVICES was set")

    assert visible_gpus("2,3", no_count) == ["2", "3"]
    assert visible_gpus("GPU-1f2e, GPU-9a8b", no_count) == ["GPU-1f2e", "GPU-9a8b"]
    assert visible_gpus("", no_count) == []  # set but empty: CUDA sees no GPU
    assert visible_gpus(None, lambda: 2) == ["0", "1"]
    assert visible_gpus(None, lambda: 0) == []


def test_each_local_worker_gets_its_own_gpu_and_takes_turns_when_they_run_out():
    from pipelines.dask_runner import worker_gpu

    assert [worker_gpu(i, ["2", "3"]) for i in range(2)] == ["2", "3"]
    assert [worker_gpu(i, ["2", "3"]) for i in range(5)] == ["2", "3", "2", "3", "2"]


def test_a_local_cluster_has_one_single_threaded_worker_per_gpu():
    from pipelines.dask_runner import OneGPUPerWorker, local_cluster_kwargs

    dask = RunnerConfig(kind="dask")
    kwargs = local_cluster_kwargs(dask, ["0", "1", "2", "3"])
    assert (kwargs["n_workers"], kwargs["threads_per_worker"], kwargs["processes"]) == (
        4, 1, True)
    (plugin,) = kwargs["plugins"]
    assert isinstance(plugin, OneGPUPerWorker) and plugin.gpus == ("0", "1", "2", "3")
    assert kwargs["memory_limit"] == 0  # a worker reading a model is not restarted
    assert local_cluster_kwargs(dask, []) == {"n_workers": 1, "threads_per_worker": 1,
                                              "processes": True, "memory_limit": 0,
                                              "host": "127.0.0.1",
                                              "dashboard_address": "127.0.0.1:8787"}  # 1 CPU
    assert local_cluster_kwargs(RunnerConfig(kind="dask", workers=3), [])["n_workers"] == 3


def test_a_local_cluster_listens_on_this_machine_only_unless_told():
    """Scheduler and workers on 127.0.0.1 (LocalCluster's `host`), the dashboard where
    runner.dashboard says (Dask's own default, ":8787", is every interface), none when null;
    the workers' own dashboards stay off (no worker_dashboard_address)."""
    from pipelines.dask_runner import local_cluster_kwargs

    kwargs = local_cluster_kwargs(RunnerConfig(kind="dask"), ["0"])
    assert (kwargs["host"], kwargs["dashboard_address"]) == ("127.0.0.1", "127.0.0.1:8787")
    assert "worker_dashboard_address" not in kwargs
    assert local_cluster_kwargs(RunnerConfig(kind="dask", dashboard=None),
                                [])["dashboard_address"] is None
    assert local_cluster_kwargs(RunnerConfig(kind="dask", dashboard="0.0.0.0:8788"),
                                [])["dashboard_address"] == "0.0.0.0:8788"


@pytest.mark.slow
def test_the_gpu_plugin_sets_each_spawned_worker_s_cuda_visible_devices(monkeypatch):
    """The plugin reaches worker processes and runs before they take work; on this CPU-only
    machine the GPU names are made up, which CUDA would just find empty."""
    from distributed import Client, LocalCluster

    from pipelines.dask_runner import local_cluster_kwargs

    marker = _mark_new_processes(monkeypatch)
    # Port 0: any free port, so that parallel test runs do not meet on 8787.
    kwargs = local_cluster_kwargs(RunnerConfig(kind="dask", dashboard="127.0.0.1:0"),
                                  ["7", "9"])
    with LocalCluster(**kwargs) as cluster, Client(cluster) as client:
        # A lambda: `os.environ.get` itself would be pickled with this process's environ.
        seen = client.run(lambda: os.environ.get("CUDA_VISIBLE_DEVICES"))
        names = {address: w["name"] for address, w in client.scheduler_info()["workers"].items()}
        assert {names[address]: gpu for address, gpu in seen.items()} == {0: "7", 1: "9"}
        # Where everything listens: the dashboard's sockets (tornado's, the only way to see
        # what it bound), the scheduler's and the workers' addresses.
        dashboard = cluster.scheduler.http_server._sockets.values()
        assert {s.getsockname()[0] for s in dashboard} == {"127.0.0.1"}
        assert all(a.startswith("tcp://127.0.0.1:")
                   for a in [cluster.scheduler_address, *names])
    assert _gone(marker)


# Models loaded once per process.

@pytest.mark.slow  # several seconds: a whole build with models
def test_a_process_loads_each_model_once_however_many_shards_it_runs(tmp_path, models,
                                                                    monkeypatch):
    from cpo_data.backends import comet_score, hf_generate, loaded

    loaded.forget()
    loads = Counter()

    def counting(kind, load):
        def counted(config):
            loads[kind] += 1
            return load(config)
        return counted

    monkeypatch.setattr(hf_generate, "load_generator",
                        counting("generator", hf_generate.load_generator))
    monkeypatch.setattr(comet_score, "load_scorer", counting("scorer", comet_score.load_scorer))
    # A model folder of its own, since this test rewrites it.
    models = dict(models, causal=str(shutil.copytree(models["causal"], tmp_path / "causal")))
    summary = build.run_build(load_config(write_config(tmp_path, models, DEMO_ROWS[:40])))
    assert summary.shards == 5
    assert loads == {"generator": 1, "scorer": 2}  # tiny; kiwi and chrf (was 5 and 10)
    # What each shard reports is its own work: the totals add up to the sources once.
    assert summary.generated == {"tiny": 40}
    assert summary.workers == {build.process_name(): 10}

    config = build.with_work_dir(load_config(tmp_path / "build.yaml"))
    shard = build.load_build_sources(config).table.slice(0, 8)
    hf_generate.release_models()  # forgets the kept objects too
    build.generate_shard(shard, config)
    assert loads["generator"] == 1  # all cached: a model loads on its first cache miss only
    # Without the cache every shard has work: after the release the next one loads again.
    config = dataclasses.replace(
        config, generate=dataclasses.replace(config.generate, cache_dir=None))
    build.generate_shard(shard, config)
    assert loads["generator"] == 2
    build.generate_shard(shard, config)
    assert loads["generator"] == 2
    # A model folder rewritten in place (a retrained model under the same path), as a worker
    # that outlives builds may see: its next shard builds the generator from the new files.
    (Path(models["causal"]) / "README.md").write_text("retrained")
    build.generate_shard(shard, config)
    assert loads["generator"] == 3


@pytest.mark.slow  # several seconds: a whole build with models
def test_a_rebuild_with_everything_cached_loads_no_model(tmp_path, models, monkeypatch):
    """A new process (nothing kept) rebuilding what the caches hold: no weights are read."""
    from cpo_data.backends import comet_score, hf_generate

    config = load_config(write_config(tmp_path, models, DEMO_ROWS[:16]))
    first = build.run_build(config)
    hf_generate.release_models()  # as a fresh process starts: nothing loaded, nothing kept
    comet_score._load.cache_clear()
    loads = Counter()
    for module, name in ((hf_generate, "load_generator"), (comet_score, "load_scorer")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda config, _real=real, _name=name:
                            loads.update([_name]) or _real(config))
    again = build.run_build(config)  # every shard's stages were kept: nothing runs
    assert loads == Counter()
    assert again.shards_reused == again.shards and again.generated == {} and again.unchanged
    # Without the kept stages, the content caches serve every candidate and score.
    shutil.rmtree(tmp_path / "work" / "shards")
    cached = build.run_build(config)
    assert loads == Counter()
    assert cached.generated == {"tiny": 0} and cached.generated_from_cache == {"tiny": 16}
    assert cached.scored == {"kiwi": 0, "chrf": 0}
    assert cached.triplets == first.triplets and cached.unchanged
    # The same build with one new source loads the generator and the COMET scorer once.
    grown = load_config(write_config(tmp_path, models, DEMO_ROWS[:17]))
    build.run_build(grown)
    assert loads == Counter({"load_generator": 1, "load_scorer": 2})  # kiwi and chrf


@pytest.mark.slow  # a second or two: a whole build
def test_ingestion_and_truncation_reach_the_summary_manifest_and_inspect(tmp_path, models,
                                                                       capsys):
    from pipelines.cli import print_inspect

    rows = DEMO_ROWS[:8] + DEMO_ROWS[:2]  # two repeats, collapsed into their first rows
    path = write_config(tmp_path, models, rows)
    data = yaml.safe_load(path.read_text())
    data["generate"]["models"][0]["max_source_tokens"] = 4  # every demo source is longer
    path.write_text(yaml.safe_dump(data))
    summary = build.run_build(load_config(path))
    assert summary.ingestion == {"rows_read": 10, "sources": 8, "duplicates_collapsed": 2,
                                 "empty_system_outputs": 0}
    assert summary.truncated == {"generate": {"tiny": 8}, "score": {"kiwi": 0, "chrf": 0}}
    provenance = store.read_manifest(summary.dataset_uri)["provenance"]
    assert provenance["ingestion"] == summary.ingestion
    assert provenance["truncated"] == summary.truncated
    print_inspect(summary.dataset_uri, rows=0)
    shown = capsys.readouterr().out
    assert "ingested  10 rows read, 8 sources, 2 duplicates collapsed" in shown
    assert "truncated generation: tiny 8; scoring: kiwi 0, chrf 0" in shown


def test_shard_keys_ignore_batching_and_follow_what_changes_outputs(tmp_path, models):
    def keys(**changes):
        config = load_config(write_config(tmp_path, models, DEMO_ROWS[:8]))
        generator, scorer = config.generate.models[0], config.score.scorers[0]
        generate = dataclasses.replace(config.generate, models=(dataclasses.replace(
            generator, **changes.get("generator", {})),))
        score = dataclasses.replace(config.score, scorers=(dataclasses.replace(
            scorer, **changes.get("scorer", {})), *config.score.scorers[1:]))
        run = build.start_build(dataclasses.replace(config, generate=generate, score=score))
        return run.shards[0].generate_key, run.shards[0].score_key

    base = keys()
    assert keys(scorer={"max_batch_size": 2, "token_budget": 99, "device": "cpu"}) == base
    assert keys(generator={"max_batch_size": 2, "token_budget": 99, "device": "cpu"}) == base
    generate_key, score_key = base
    changed = keys(generator={"max_new_tokens": 7})
    assert changed[0] != generate_key and changed[1] != score_key  # candidates feed scoring
    changed = keys(scorer={"use_reference": True})
    assert changed[0] == generate_key and changed[1] != score_key


# Reaching a cluster.

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # 2 s: Dask's connect timeout
def test_an_unreachable_scheduler_is_a_quick_error_naming_runner_address():
    from pipelines.dask_runner import check_scheduler

    address = f"tcp://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"runner.address: no Dask scheduler answers at "
                                          f"{address} within 2 s"):
        check_scheduler(address, timeout=2)
    assert time.monotonic() - start < 15


@pytest.mark.slow  # a second or two: a local Dask scheduler
def test_a_scheduler_without_workers_is_an_error_not_a_hang():
    from distributed import LocalCluster

    from pipelines.dask_runner import check_scheduler

    with LocalCluster(n_workers=0, processes=False, dashboard_address=None) as cluster:
        with pytest.raises(ConfigError, match="runner.address: the scheduler at .* has no "
                                              "worker after 1 s"):
            check_scheduler(cluster.scheduler_address, timeout=1)


# The flow on Dask.

@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_dask_on_two_local_workers_publishes_the_same_triplets_as_the_default_runner(
        tmp_path, models, monkeypatch, capsys):
    from pipelines.build import build_triplets
    from pipelines.cli import print_build_summary

    marker = _mark_new_processes(monkeypatch)
    rows = DEMO_ROWS[:32]  # 4 shards of 8
    (tmp_path / "threads").mkdir()
    (tmp_path / "dask").mkdir()
    threads = build_triplets(str(write_config(tmp_path / "threads", models, rows)), retries=0)
    # Its own work_dir (given as a file:// URI, as shared storage would be): nothing is
    # reused from the first build, every shard is generated and scored on the workers.
    dask = build_triplets(str(write_config(
        tmp_path / "dask", models, rows, runner={"kind": "dask", "workers": 2},
        work_dir=f"file://{tmp_path / 'dask' / 'work'}")), retries=0)

    assert _gone(marker), "a Dask process outlived the build"
    assert dask["shards"] == threads["shards"] == 4 and dask["shards_reused"] == 0
    assert dask["generated"] == threads["generated"] == {"tiny": 32}
    assert dask["scored"] == threads["scored"]
    # 8 tasks (generate and score per shard): in this process with threads, and in at least
    # two other processes, the workers, with Dask.
    assert threads["workers"] == {build.process_name(): 8}
    assert sum(dask["workers"].values()) == 8 and len(dask["workers"]) >= 2
    assert build.process_name() not in dask["workers"]
    print_build_summary(dask, rows=0)
    out = capsys.readouterr().out
    assert f"workers         {len(dask['workers'])} processes ran shard tasks: " in out
    # Finished shards went to the URI's folder, for a rerun to resume from; the workers read
    # each shard's sources there too (the tasks carry keys, not tables).
    staged = tmp_path / "dask" / "work" / "shards"
    assert len(list(staged.glob("*.json"))) == 12  # 4 shards x (sources, generate, score)

    published = _published(tmp_path / "dask")
    assert len(published) == dask["triplets"] == threads["triplets"] > 0
    assert published == _published(tmp_path / "threads")
    assert (store.read_dropped(str(tmp_path / "dask" / "store"), name="flowtest")
            .sort_values(["source_id", "reason"]).reset_index(drop=True).equals(
                store.read_dropped(str(tmp_path / "threads" / "store"), name="flowtest")
                .sort_values(["source_id", "reason"]).reset_index(drop=True)))

    # What the workers stored, this process reads back: a rerun here (default runner, same
    # work_dir) finds every shard finished.
    again = build_triplets(str(write_config(
        tmp_path / "dask", models, rows, work_dir=f"file://{tmp_path / 'dask' / 'work'}")),
        retries=0)
    assert again["shards_reused"] == 4 and again["generated"] == {} and again["workers"] == {}
    assert _published(tmp_path / "dask") == published


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_a_running_cluster_is_used_by_its_address_and_left_running(tmp_path, models):
    """runner.address: the build connects to a cluster someone else started (in this process
    here, to stay quick) and does not stop it."""
    from distributed import Client, LocalCluster

    from pipelines.build import build_triplets

    with LocalCluster(n_workers=1, processes=False, threads_per_worker=1,
                      dashboard_address=None) as cluster:
        summary = build_triplets(str(write_config(
            tmp_path, models, DEMO_ROWS[:16],
            runner={"kind": "dask", "address": cluster.scheduler_address})), retries=0)
        assert summary["shards"] == 2 and summary["generated"] == {"tiny": 16}
        assert summary["workers"] == {build.process_name(): 4}  # the worker's threads are ours
        with Client(cluster) as client:
            assert len(client.scheduler_info()["workers"]) == 1


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_an_unreachable_cluster_fails_the_build_naming_runner_address(tmp_path, models,
                                                                     monkeypatch):
    from pipelines import dask_runner
    from pipelines.build import build_triplets

    monkeypatch.setattr(dask_runner, "CONNECT_TIMEOUT_S", 1.0)
    address = f"tcp://127.0.0.1:{_free_port()}"
    config = write_config(tmp_path, models, DEMO_ROWS[:8],
                          runner={"kind": "dask", "address": address})
    with pytest.raises(ConfigError, match=f"runner.address: no Dask scheduler answers at "
                                          f"{address}"):
        build_triplets(str(config), retries=0)
    assert not list(tmp_path.rglob(store.MANIFEST))  # nothing published


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_server")
def test_finished_shards_on_an_fsspec_uri_are_stored_there_and_reused(tmp_path, models):
    """A work_dir URI other than file:// keeps the finished shards there, through fsspec
    (memory:// here: one process, so the default runner)."""
    import fsspec

    from pipelines.build import build_triplets

    work = f"memory://cpo-data-test-{uuid.uuid4().hex[:8]}/work"
    config = write_config(tmp_path, models, DEMO_ROWS[:16], work_dir=work)
    first = build_triplets(str(config), retries=0)
    memory = fsspec.filesystem("memory")
    assert len([p for p in memory.ls(f"{work}/shards", detail=False)
                if p.endswith(".json")]) == 6  # 2 shards x (sources, generate, score)
    assert memory.ls(f"{work}/cache")  # the content caches went there too
    again = build_triplets(str(config), retries=0)
    assert again["shards_reused"] == again["shards"] == first["shards"] == 2
    assert again["generated"] == {} and again["triplets"] == first["triplets"]
