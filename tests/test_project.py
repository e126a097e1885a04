"""One project file, read once by every entry point; paths resolved by one mechanism."""

from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from pathlib import Path

import pytest
import yaml

from cpo_data import config as build_config
from cpo_data.config import ALMA_PROMPT
from cpo_data.project import read_project, resolve_paths
from training import config as train_config

PROJECT = {
    "sources": [{"path": "data/sources.jsonl", "src_lang": "de", "tgt_lang": "en"}],
    "generate": {"models": [{"name": "tiny", "model": "./models/tiny", "adapter": "./lora"},
                            {"name": "own", "model": "org/model",
                             "prompt_template": "Own: {src}"}],
                 "cache_dir": "cache"},
    "score": {"scorers": [{"name": "kiwi", "model": "./kiwi/checkpoints/model.ckpt"}]},
    "publish": {"uri": "store", "name": "mt"},
    "work_dir": "work",
    "train": {"model": "./models/tiny", "output_dir": "runs",
              "lora": {"adapter": "./lora"},
              "eval": {"test_set": {"path": "test.jsonl", "src_lang": "de", "tgt_lang": "en"},
                       "comet": {"name": "kiwi", "model": "./kiwi"}}},
    "deploy": {"schedule": {"cron": "0 3 * * *"}},
}


def write(folder: Path, data: dict) -> Path:
    path = folder / "project.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def reads(monkeypatch):
    """How often each file was read with `Path.read_text` (how YAML files are read)."""
    counts: Counter[Path] = Counter()
    real = Path.read_text

    def counting(self, *args, **kwargs):
        counts[Path(self).resolve()] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting)
    return counts


class Stop(Exception):
    """Raised where an entry point would start its work: everything before it is reading."""


def _stop(*_args, **_kwargs):
    raise Stop


def test_paths_resolve_against_the_file_s_folder_in_every_section(tmp_path):
    from pipelines.project import load_project

    project = load_project(write(tmp_path, PROJECT))
    base = str(tmp_path)
    build, train = project.build, project.train
    assert build.sources[0].path == f"{base}/data/sources.jsonl"
    assert build.generate.models[0].model == f"{base}/models/tiny"
    assert build.generate.models[0].adapter == f"{base}/lora"
    assert build.generate.models[1].model == "org/model"  # a hub id stays one
    assert build.generate.cache_dir == f"{base}/cache"
    assert build.score.scorers[0].model == f"{base}/kiwi/checkpoints/model.ckpt"
    assert build.publish.uri == f"{base}/store" and build.work_dir == f"{base}/work"
    assert train.model == f"{base}/models/tiny" and train.output_dir == f"{base}/runs"
    assert train.lora.adapter == f"{base}/lora"
    assert train.eval.test_set.path == f"{base}/test.jsonl"
    assert train.eval.comet.model == f"{base}/kiwi"
    # train.dataset is derived in one place: the dataset the build publishes.
    assert train.dataset == project.dataset == f"{base}/store/mt"
    assert project.deploy.schedule.cron == "0 3 * * *"


PATH_WORDS = ("path", "uri", "dir", "model", "adapter", "dataset")
NOT_PATHS = {"EndpointConfig.model"}
"""Fields with a path word that hold no path: a served model's name as its server knows it."""


def _config_classes():
    from pipelines import deploy

    seen, todo = [], [build_config.BuildConfig, train_config.TrainConfig, deploy.DeployConfig]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for hint in typing.get_type_hints(cls).values():
            for inner in (hint, *typing.get_args(hint)):
                for candidate in (inner, *typing.get_args(inner)):
                    if dataclasses.is_dataclass(candidate):
                        todo.append(candidate)
    return seen


def test_every_path_field_is_marked_so_it_resolves():
    """A new path-like string field without FILE or MODEL would resolve against the working
    directory: refuse it here."""
    unmarked = [f"{cls.__name__}.{f.name}" for cls in _config_classes()
                for f in dataclasses.fields(cls)
                if set(f.name.split("_")) & set(PATH_WORDS) and "str" in str(f.type)
                and "path" not in f.metadata and f"{cls.__name__}.{f.name}" not in NOT_PATHS]
    assert unmarked == []
    assert len(_config_classes()) >= 10  # the walk reached the nested sections


def test_resolving_a_config_built_in_code_marks_nothing_twice(tmp_path):
    config = train_config.TrainConfig(model="./m", output_dir="runs", dataset="/abs/store/mt")
    resolved = resolve_paths(config, tmp_path)
    assert (resolved.model, resolved.output_dir, resolved.dataset) == (
        str(tmp_path / "m"), str(tmp_path / "runs"), "/abs/store/mt")
    assert resolve_paths(resolved, tmp_path / "elsewhere") == resolved


def test_one_prompt_template_for_the_whole_project(tmp_path):
    from pipelines.project import load_project

    prompt = "Translate {Src} to {Tgt}: {src}\n{Tgt}:"
    project = load_project(write(tmp_path, {**PROJECT, "prompt_template": prompt}))
    tiny, own = project.build.generate.models
    assert tiny.prompt_template == prompt and own.prompt_template == "Own: {src}"  # override
    assert project.build.select.prompt_template == prompt
    assert project.train.eval.prompt_template == prompt
    plain = load_project(write(tmp_path, PROJECT))
    assert plain.build.select.prompt_template == plain.train.eval.prompt_template == ALMA_PROMPT


def test_each_entry_point_reads_the_file_once(tmp_path, reads, monkeypatch):
    import cpo_data.preflight
    import training.__main__ as python_m_training
    import training.run
    from pipelines import build as build_flow
    from pipelines import cli, demo, deploy
    from pipelines import train as train_flow
    from pipelines.project import load_project

    path = write(tmp_path, PROJECT)
    runs: dict[str, object] = {}
    # The project names models that are not there; the preflight (its own tests) would stop
    # every entry point before the point this test looks at.
    monkeypatch.setattr(cpo_data.preflight, "_resolve", lambda *_: [])

    def keep(name):
        def record(config, *_args, **_kwargs):
            runs[name] = config
            raise Stop
        return record

    def once(name, call):
        reads.clear()
        with pytest.raises(Stop):
            call()
        assert reads[path.resolve()] == 1, name

    monkeypatch.setattr(cli, "_run_build", keep("build"))
    once("cpo-data build", lambda: cli.main(["build", str(path)]))
    monkeypatch.setattr(cli.store, "resolve_version", lambda *_args: "v")
    monkeypatch.setattr(cli, "_run_train", keep("train"))
    once("cpo-data train", lambda: cli.main(["train", str(path)]))
    assert runs["build"] == load_project(path).build and runs["train"] == load_project(path).train
    monkeypatch.setattr(deploy, "check_server", _stop)
    once("cpo-data serve", lambda: cli.main(["serve", str(path)]))
    monkeypatch.setattr(training.run, "run_training", keep("python -m training"))
    once("python -m training", lambda: python_m_training.main([str(path)]))
    # The flows, given the file's path (as deployments give it): stopped at their first work.
    monkeypatch.setattr(build_flow, "get_run_logger", lambda: __import__("logging").getLogger())
    monkeypatch.setattr(build_flow.build, "start_build", _stop)
    once("build flow", lambda: build_flow.build_triplets.fn(str(path)))
    monkeypatch.setattr(train_flow, "load_triplets", _stop)
    once("train flow", lambda: train_flow.train_cpo.fn(str(path)))
    # The demo reads its own file once for both of its configs.
    monkeypatch.setattr(demo, "DEMO_CONFIG", path)
    monkeypatch.setattr(demo, "ensure_demo_model", lambda p: p)
    once("cpo-data demo", lambda: cli.main(["demo", "--store", str(tmp_path / "s")]))
    assert runs["build"].publish.uri == str(tmp_path / "s")


def test_a_file_that_is_not_a_mapping_is_named(tmp_path):
    from cpo_data.fields import ConfigError

    path = tmp_path / "project.yaml"
    path.write_text("- just\n- a list\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"project\.yaml: expected a mapping of sections"):
        read_project(path)


def test_a_training_only_file_names_its_dataset_by_publish(tmp_path):
    from pipelines.project import load_project

    path = write(tmp_path, {"publish": PROJECT["publish"], "train": {"model": "./m"}})
    project = load_project(path)
    assert project.build is None
    assert project.train.dataset == train_config.load_train_config(path).dataset == str(
        tmp_path / "store" / "mt")


def test_a_bad_project_prompt_is_named_by_its_own_key(tmp_path):
    from cpo_data.fields import ConfigError
    from pipelines.project import load_project

    with pytest.raises(ConfigError, match=r"project\.yaml: prompt_template: must contain"):
        load_project(write(tmp_path, {**PROJECT, "prompt_template": "no source here"}))
    with pytest.raises(ConfigError, match=r"select: expected a mapping"):
        load_project(write(tmp_path, {**PROJECT, "prompt_template": "{src}", "select": ["x"]}))


def test_home_relative_paths_expand(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    resolved = resolve_paths(train_config.TrainConfig(model="~/m", output_dir="~/runs"),
                             tmp_path / "project")
    assert (resolved.model, resolved.output_dir) == (str(tmp_path / "home" / "m"),
                                                     str(tmp_path / "home" / "runs"))
