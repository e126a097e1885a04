"""Training dashboards (`train.report_to`): every line the loop writes to `metrics.jsonl` goes to
TensorBoard, Weights & Biases, MLflow or trackio too, under the same names (`loss`,
`rewards/accuracies`, `eval/loss`, ...), at the same optimizer step.

`metrics.jsonl` stays the record (the run manifest, resume and the tests read it); a dashboard
is a view of it. Each backend is an optional extra (`pip install cpo-data[wandb]`), imported
only when a run asks for it; `check_backends` imports them all before the run loads anything,
so a missing one stops the run in seconds, not after the model has loaded. Only rank 0 opens
the writers (`open_reporters(..., main=False)` reports nowhere).

Where each writes:
- tensorboard: `{run_dir}/tensorboard/`, one event file per attempt, written by the
  `tensorboard` package's own event writer (the one `torch.utils.tensorboard.SummaryWriter`
  wraps; no TensorFlow); `tensorboard --logdir {output_dir}` shows every version's run. A
  resumed run marks where it starts, so TensorBoard hides what the first attempt logged after
  the checkpoint, as `metrics.jsonl` drops those lines. Scalars are stored as float32.
- wandb: a run named after the run folder, files in `{run_dir}/wandb/` unless `WANDB_DIR` says
  otherwise; project, entity and mode (`WANDB_MODE=offline`) come from wandb's own
  environment variables. The train config is the run's config.
- mlflow: a run named after the run folder, at `MLFLOW_TRACKING_URI`, else in the file store
  `{run_dir}/mlruns/`.
- trackio: project `TRACKIO_PROJECT` (default `cpo-data`), run named after the run folder.

A resumed run opens a new wandb, mlflow or trackio run, which carries on from the resumed step.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from training.errors import TrainingError

TENSORBOARD_DIR = "tensorboard"
# The module each backend (`training.config.REPORT_TO`) imports; its pip extra has its name.
_MODULES = {"tensorboard": "tensorboard.summary.writer.event_file_writer", "wandb": "wandb",
            "mlflow": "mlflow", "trackio": "trackio"}


def check_backends(report_to: Sequence[str]) -> None:
    """Import every backend the run reports to; one that is missing stops the run with the
    extra that installs it. Every process checks, so all of them stop together."""
    for name in report_to:
        try:
            importlib.import_module(_MODULES[name])
        except ImportError as error:
            raise TrainingError(f"train.report_to: {name} needs `pip install cpo-data[{name}]` "
                                f"({error})") from None


class Reporters:
    """The run's open dashboards. `log(line)` sends one metrics.jsonl line (its `step` is the
    step, every other key a scalar); use as a context manager, so that a run that stops
    (diverged, interrupted) still flushes and closes them."""

    def __init__(self, writers: list[Any]):
        self.writers = writers

    def log(self, line: dict[str, Any]) -> None:
        values = {k: v for k, v in line.items() if k != "step"}
        for writer in self.writers:
            writer.log(line["step"], values)

    def close(self) -> None:
        for writer in self.writers:
            writer.close()
        self.writers = []

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def open_reporters(config, run_dir: Path, start: int, main: bool = True) -> Reporters:
    """The dashboards `config.report_to` names, for a run that continues after step `start`
    (0: a fresh run); none on processes other than the main one."""
    if not main:
        return Reporters([])
    writers = []
    for name in config.report_to:
        if name == "tensorboard":
            writers.append(_TensorBoard(run_dir, start))
        elif name == "wandb":
            writers.append(_Wandb(config, run_dir))
        elif name == "mlflow":
            writers.append(_Mlflow(run_dir))
        elif name == "trackio":
            writers.append(_Trackio(config, run_dir))
    return Reporters(writers)


def _config_dict(config) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists


class _TensorBoard:
    """One event per step holding all of its scalars, written by tensorboard's own
    `EventFileWriter` (which `torch.utils.tensorboard.SummaryWriter` wraps): SummaryWriter's
    `add_scalar` makes one event per metric, about 7x the main thread's time for a step's 14
    metrics (bench/README.md). Readers see the same scalars either way."""

    def __init__(self, run_dir: Path, start: int):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.event, self.summary = Event, Summary
        self.writer = EventFileWriter(str(run_dir / TENSORBOARD_DIR))
        if start:
            # TensorBoard hides the events from this step on that an earlier attempt wrote:
            # they are superseded (SummaryWriter's `purge_step` writes the same marker).
            self.writer.add_event(Event(wall_time=time.time(), step=start + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def log(self, step: int, values: dict[str, float]) -> None:
        summary = self.summary(value=[self.summary.Value(tag=name, simple_value=value)
                                      for name, value in values.items()])
        self.writer.add_event(self.event(wall_time=time.time(), step=step, summary=summary))

    def close(self) -> None:
        self.writer.close()  # writes what is queued, then joins the writer's thread


class _Wandb:
    def __init__(self, config, run_dir: Path):
        import wandb

        self.run = wandb.init(name=run_dir.name, dir=os.environ.get("WANDB_DIR", str(run_dir)),
                              config=_config_dict(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Mlflow:
    def __init__(self, run_dir: Path):
        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.run = mlflow.start_run(run_name=run_dir.name)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class _Trackio:
    def __init__(self, config, run_dir: Path):
        import trackio

        self.trackio = trackio
        trackio.init(project=os.environ.get("TRACKIO_PROJECT", "cpo-data"), name=run_dir.name,
                     config=_config_dict(config))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()
