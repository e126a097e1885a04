"""`train.report_to`: the dashboards get every metrics.jsonl line under the same names and steps.

TensorBoard is read back from its event files with tensorboard's own `EventAccumulator`; W&B
runs offline (its `.wandb` file read back record by record) when it is installed; MLflow and
trackio cannot be installed beside the pinned set (README, "Training"), so their glue is
checked against stand-in modules that record the calls.
"""

from __future__ import annotations

import glob
import json
import sys
import threading
import types

import numpy as np
import pytest

from cpo_data.fields import ConfigError
from cpo_data.project import from_dict
from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from tests.conftest import train_config
from tests.test_training_ddp import published  # noqa: F401 - the two-process run's fixture
from training import loop, reporting
from training.config import REPORT_TO, EvalConfig, LoraSettings, TrainConfig, resume_settings
from training.loop import TrainingError, train


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_causal_lm(tmp_path_factory.mktemp("model") / "llama"))


@pytest.fixture(scope="module")
def triplets() -> list[dict]:
    return sample_triplets(rows_per_pair=6).to_pylist()  # 12


def make_config(model_dir: str, **changes) -> TrainConfig:
    # 3 held out, 9 train in steps of 2: evaluations at steps 2 and 4 (the end) as well.
    settings = dict(model=model_dir, batch_size=2, max_steps=4, learning_rate=1e-2,
                    lr_scheduler="constant", warmup_ratio=0.0, seed=0, device="cpu",
                    lora=LoraSettings(rank=4, alpha=8, dropout=0.0),
                    eval=EvalConfig(held_out=3, every_steps=2, batch_size=3),
                    report_to=("tensorboard",))
    settings.update(changes)
    return train_config(**settings)


def metric_lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_scalars(lines: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as TensorBoard should hold it: every key but `step` is a tag, each value
    at its line's step, rounded to float32. An event stores a scalar in a protobuf float
    (`simple_value`), and the writer hands it the Python float of metrics.jsonl: protobuf rounds
    it to the nearest float32, as `np.float32` does, so the values must be EQUAL. A tolerance of
    float32's relative precision (6e-8) would be as strict; equality also says that no other
    rounding happened on the way (a value that went through float16, or another step's)."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for line in lines:
        for name, value in line.items():
            if name != "step":
                scalars.setdefault(name, []).append((line["step"], float(np.float32(value))))
    return scalars


def tensorboard_scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import (
        SCALARS,
        EventAccumulator,
    )

    events = EventAccumulator(str(run_dir / reporting.TENSORBOARD_DIR),
                              size_guidance={SCALARS: 0})  # 0: keep every event
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def event_writer_threads() -> int:
    """Live TensorBoard writer threads. On a local disk each event is appended to the file as
    soon as this thread takes it off its queue, so the file can look complete before the
    writer is closed; closing joins the thread after it wrote the whole queue (and flushes
    remote files, which only `flush` uploads). A live one after the run is a writer left open."""
    return sum(type(t).__name__ == "_AsyncWriterThread" for t in threading.enumerate())


def test_tensorboard_holds_metrics_jsonl(model_dir, triplets, tmp_path):
    run = tmp_path / "run"
    writers = event_writer_threads()
    train(make_config(model_dir), triplets, run, progress=False)
    assert event_writer_threads() == writers  # closed

    lines = metric_lines(run)
    assert [(m["step"], "eval/loss" in m) for m in lines] == \
        [(1, False), (2, False), (2, True), (3, False), (4, False), (4, True)]
    got = tensorboard_scalars(run)
    assert {"loss", "nll_loss", "rewards/accuracies", "logps/chosen", "learning_rate",
            "grad_norm", "epoch", "tokens_per_second", "eval/loss",
            "eval/rewards/accuracies"} <= got.keys()
    assert got == expected_scalars(lines)
    # One event file: the run opened one writer.
    assert len(list((run / reporting.TENSORBOARD_DIR).iterdir())) == 1


def test_a_resumed_run_supersedes_the_steps_after_its_checkpoint(model_dir, triplets,
                                                                  tmp_path):
    """A crash after step 3 (checkpoint at 2): the events written before it are all on disk,
    and after the resume TensorBoard shows steps 3 and 4 once, from the resumed run (their
    timing metrics differ from the first attempt's)."""
    run = tmp_path / "run"
    config = make_config(model_dir, save_steps=2, eval=EvalConfig())

    class Crash(Exception):
        pass

    def crash_after_step_3(step, metrics):
        if step == 3:
            raise Crash

    writers = event_writer_threads()
    with pytest.raises(Crash):
        train(config, triplets, run, progress=False, on_step=crash_after_step_3)
    assert event_writer_threads() == writers  # closed on the way out
    first = metric_lines(run)
    assert [m["step"] for m in first] == [1, 2, 3]
    assert tensorboard_scalars(run) == expected_scalars(first)

    result = train(config, triplets, run, progress=False)
    assert result.resumed_from_step == 2
    lines = metric_lines(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert lines[2]["tokens_per_second"] != first[2]["tokens_per_second"]
    assert tensorboard_scalars(run) == expected_scalars(lines)


def test_report_to_is_free_on_resume(model_dir):
    """Where the metrics also go does not change a step: a resumed run may add a dashboard."""
    assert "report_to" not in resume_settings(make_config(model_dir))


def test_an_unknown_or_repeated_dashboard_is_refused_with_its_key():
    with pytest.raises(ConfigError, match=r"^train\.report_to\[1\]: 'tensorbord' is not one "
                       r"of tensorboard, wandb, mlflow, trackio$"):
        from_dict(TrainConfig, {"model": "m", "report_to": ["wandb", "tensorbord"]}, "train")
    with pytest.raises(ConfigError, match=r"^train\.report_to\[1\]: 'wandb' is named twice$"):
        from_dict(TrainConfig, {"model": "m", "report_to": ["wandb", "wandb"]}, "train")
    with pytest.raises(ConfigError, match=r"^train\.report_to: expected a list, got str"):
        from_dict(TrainConfig, {"model": "m", "report_to": "wandb"}, "train")
    with pytest.raises(ConfigError, match=r"^report_to: expected a list, e\.g\. \[wandb\]$"):
        TrainConfig(model="m", report_to="wandb")
    assert from_dict(TrainConfig, {"model": "m", "report_to": []}, "train").report_to == ()


def test_every_dashboard_has_a_backend():
    assert set(REPORT_TO) == set(reporting._MODULES)


@pytest.mark.parametrize("name", REPORT_TO)
def test_a_missing_backend_stops_the_run_before_anything_loads(name, model_dir, triplets,
                                                                tmp_path, monkeypatch):
    # None in sys.modules makes `import` raise ImportError, as for a package not installed.
    monkeypatch.setitem(sys.modules, reporting._MODULES[name], None)

    def never(*args, **kwargs):
        raise AssertionError("loaded before the missing backend was found")

    monkeypatch.setattr(loop, "load_tokenizer", never)
    monkeypatch.setattr(loop, "load_model", never)
    with pytest.raises(TrainingError, match=rf"^train\.report_to: {name} needs `pip install "
                       rf"cpo-data\[{name}\]`"):
        train(make_config(model_dir, report_to=(name,)), triplets,
              tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_other_processes_report_nowhere(model_dir, tmp_path):
    assert reporting.open_reporters(make_config(model_dir), tmp_path, 0, main=False).writers \
        == []
    assert not tmp_path.joinpath(reporting.TENSORBOARD_DIR).exists()


class Recorder(types.ModuleType):
    """A stand-in backend module: every call, in order."""

    def __init__(self, name: str):
        super().__init__(name)
        self.calls: list[tuple] = []

    def __getattr__(self, attr):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return lambda *args, **kwargs: self.calls.append((attr, args, kwargs))


LINES = [{"step": 1, "epoch": 0.5, "loss": 2.0, "rewards/accuracies": 0.5},
         {"step": 2, "epoch": 1.0, "loss": 1.5, "rewards/accuracies": 1.0},
         {"step": 2, "eval/loss": 1.7}]


def test_mlflow_gets_each_line_at_its_step(model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    mlflow = Recorder("mlflow")
    monkeypatch.setitem(sys.modules, "mlflow", mlflow)
    with reporting.open_reporters(make_config(model_dir, report_to=("mlflow",)),
                                  tmp_path / "v1", 0) as dashboards:
        for line in LINES:
            dashboards.log(line)
    assert mlflow.calls == [
        ("set_tracking_uri", ((tmp_path / "v1" / "mlruns").as_uri(),), {}),
        ("start_run", (), {"run_name": "v1"}),
        *[("log_metrics", ({k: v for k, v in line.items() if k != "step"},),
           {"step": line["step"]}) for line in LINES],
        ("end_run", (), {})]


def test_trackio_gets_each_line_at_its_step(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TRACKIO_PROJECT", "mt")
    trackio = Recorder("trackio")
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    config = make_config(model_dir, report_to=("trackio",))
    with reporting.open_reporters(config, tmp_path / "v1", 0) as dashboards:
        for line in LINES:
            dashboards.log(line)
    (init, args, kwargs), *logged, finish = trackio.calls
    assert (init, args, kwargs["project"], kwargs["name"]) == ("init", (), "mt", "v1")
    assert kwargs["config"]["report_to"] == ["trackio"]
    assert logged == [("log", ({k: v for k, v in line.items() if k != "step"},),
                       {"step": line["step"]}) for line in LINES]
    assert finish == ("finish", (), {})


def wandb_history(run_dir) -> list[dict]:
    """The history rows of the offline run's `.wandb` file (a log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    path, = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    store = datastore.DataStore()
    store.open_for_scan(path)
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


@pytest.mark.slow
def test_wandb_offline_holds_metrics_jsonl(model_dir, triplets, tmp_path, monkeypatch):
    """W&B merges what is logged at one step into one history row: a step's line and its
    evaluation's. Values travel as JSON, so they are equal to metrics.jsonl's."""
    wandb = pytest.importorskip("wandb")
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")  # no sentry, even offline
    monkeypatch.delenv("WANDB_DIR", raising=False)  # so the files go to the run folder
    run = tmp_path / "run"
    try:
        train(make_config(model_dir, report_to=("wandb",)), triplets, run, progress=False)
    finally:
        wandb.teardown()  # stops wandb's service process
    rows: dict[int, dict] = {}
    for line in metric_lines(run):
        rows.setdefault(line["step"], {}).update(line)
    got = [{k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]}
           for row in wandb_history(run)]
    assert got == list(rows.values())


@pytest.mark.slow
def test_only_rank_0_reports(published):  # noqa: F811 - the fixture imported above
    """Two torchrun processes: rank 1 may not write under the test's folders (a writer of its
    own would stop it), and rank 0's one event file holds the whole steps' metrics."""
    from tests.test_training_ddp import launch, run_folder, write_config

    launch(write_config(published, "dashboards", report_to=["tensorboard"]), published)
    folder = run_folder(published / "dashboards")
    assert tensorboard_scalars(folder) == expected_scalars(metric_lines(folder))
    assert len(list((folder / reporting.TENSORBOARD_DIR).iterdir())) == 1
