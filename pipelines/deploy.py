"""Deployments: the build flow on a schedule, the training flow on each published version.

    cpo-data serve configs/demo.yaml      # or: from pipelines.deploy import serve; serve(...)

One YAML file holds the build (its `publish` section names the dataset), the `train` section,
and a `deploy` section:

    deploy:
      schedule:
        cron: "0 3 * * *"      # or: interval: 86400 (seconds); no schedule: run it by hand
        timezone: UTC
      train_on_publish: true   # the training deployment starts on each new version

`serve` registers two deployments with the Prefect server, `cpo-data-build/<name>` and
`cpo-data-train/<name>`, and runs their flow runs in this process's children until it is
stopped. The training deployment's trigger waits for `cpo_data.triplets.published` from this
dataset (its resource id and URI) and passes the event's version as the flow's `version`, so
each run trains on exactly the version that started it, even if a newer one lands meanwhile.

Schedules and triggers live in the server: without `PREFECT_API_URL` Prefect would start a
temporary server that dies with this process, and nothing would ever be scheduled, so `serve`
refuses to start then.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cpo_data.errors import UserError
from cpo_data.fields import ConfigError, _fail

if TYPE_CHECKING:
    from pipelines.project import Project

BUILD_FLOW = "cpo-data-build"
TRAIN_FLOW = "cpo-data-train"


class ServerError(UserError, RuntimeError):
    """No Prefect server to register deployments with."""


@dataclass(frozen=True)
class ScheduleConfig:
    """When the build runs: a cron expression or a fixed interval."""

    cron: str | None = None
    """Cron expression, e.g. "0 3 * * *" (03:00 every day)."""
    interval: int | None = None
    """Seconds between runs (instead of `cron`)."""
    timezone: str = "UTC"
    """Time zone the cron expression is read in (IANA name)."""

    def __post_init__(self) -> None:
        if (self.cron is None) == (self.interval is None):
            _fail("cron", "give either cron or interval (seconds)")
        if self.interval is not None and self.interval < 1:
            _fail("interval", "must be at least 1 (seconds)")
        from prefect.client.schemas.schedules import CronSchedule
        from pydantic import ValidationError

        # Prefect checks the expression and the time zone; a bad one fails here, not at serve.
        try:
            CronSchedule(cron=self.cron or "0 0 * * *", timezone=self.timezone)
        except ValidationError as error:
            (problem, *_) = error.errors()
            _fail(str(problem["loc"][0]), problem["msg"].removeprefix("Value error, "))

    def as_schedule(self) -> dict[str, Any]:
        """Keyword arguments for `Flow.to_deployment`."""
        from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule

        if self.cron is not None:
            return {"schedule": CronSchedule(cron=self.cron, timezone=self.timezone)}
        return {"schedule": IntervalSchedule(interval=timedelta(seconds=self.interval),
                                             timezone=self.timezone)}


@dataclass(frozen=True)
class DeployConfig:
    """The `deploy` section: how `cpo-data serve` runs the build and the training."""

    schedule: ScheduleConfig | None = None
    """When the build runs; null: only when started by hand (`prefect deployment run`)."""
    train_on_publish: bool = True
    """Serve the training flow, started by each version the build publishes."""


def check_server() -> str:
    """The configured server's API URL; a `ServerError` saying what to do when there is none
    or it does not answer."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise ServerError(
            "no Prefect server is configured (PREFECT_API_URL is not set), so schedules and "
            "triggers would have nowhere to live. Start one and point cpo-data at it:\n"
            "    prefect server start          # in another terminal; UI on "
            "http://127.0.0.1:4200\n"
            "    prefect config set PREFECT_API_URL=http://127.0.0.1:4200/api")
    with get_client(sync_client=True) as client:
        failure = client.api_healthcheck()
    if failure is not None:
        raise ServerError(f"the Prefect server at PREFECT_API_URL={url} does not answer "
                          f"({failure}): start it (`prefect server start`), or unset it "
                          "(`prefect config unset PREFECT_API_URL`) to let a build or a "
                          "training run start a temporary one")
    return url


def deployments(project: Project | str | Path) -> list:
    """The build deployment (on the config's schedule) and, unless turned off, the training
    deployment triggered by this dataset's published versions (from a loaded project, or the
    path of its file)."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.deployments.runner import EntrypointType
    from prefect.events import DeploymentEventTrigger

    from pipelines.build import PUBLISHED_EVENT, build_triplets
    from pipelines.project import load_project
    from pipelines.train import train_cpo

    if isinstance(project, (str, Path)):
        project = load_project(project)
    path = project.file.path
    name = project.need_build().publish.name
    deploy, dataset = project.deploy, project.dataset
    # Served runs import the flows by module: the installed package, whatever the cwd. One
    # run of each at a time: two builds would share work_dir, two trainings the GPUs; a run
    # started meanwhile (the schedule, a second published version) waits for the one running.
    common = {"name": name, "parameters": {"config": str(path)}, "tags": ["cpo-data", name],
              "entrypoint_type": EntrypointType.MODULE_PATH,
              "concurrency_limit": ConcurrencyLimitConfig(
                  limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)}
    schedule = deploy.schedule.as_schedule() if deploy.schedule else {}
    served = [build_triplets.to_deployment(
        description=f"Build and publish {dataset} from {path}", **schedule, **common)]
    if deploy.train_on_publish:
        train_config = project.need_train()
        if train_config.dataset != dataset:
            raise ConfigError(f"{path}: train.dataset: {train_config.dataset} is not the "
                              f"dataset this build publishes ({dataset}); a publish event "
                              "could not start it (set deploy.train_on_publish: false)")
        trigger = DeploymentEventTrigger(
            name=f"{name}: train on each published version",
            expect={PUBLISHED_EVENT},
            match={"prefect.resource.id": f"cpo-data.dataset.{name}",
                   "cpo-data.dataset-uri": dataset},
            parameters={"config": str(path), "version": "{{ event.payload.version }}"})
        served.append(train_cpo.to_deployment(
            description=f"Train on each version of {dataset} ({path})", triggers=[trigger],
            **common))
    return served


def serve(project: Project | str | Path) -> None:
    """Register the deployments and run their flow runs until interrupted (Ctrl-C pauses the
    build's schedule, as Prefect's `serve` does)."""
    from prefect import serve as prefect_serve

    # Every section is checked now, before the server is asked or the first run starts.
    served = deployments(project)
    check_server()
    prefect_serve(*served)
