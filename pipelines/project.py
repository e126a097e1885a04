"""The whole project file as frozen configs: build, train and deploy sections, read once.

Every entry point on this layer (the command line, the flows when given a path, `serve`, the
demo) loads a project here; `python -m training`, below this layer, reads its one section
through `training.config.load_train_config`, which reads the file once as well.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpo_data.config import BuildConfig
from cpo_data.fields import ConfigError
from cpo_data.preflight import (
    Need,
    PreflightError,
    Report,
    build_needs,
    check,
    comet_dtype_problems,
)
from cpo_data.project import ProjectFile, build_section, parse, published_dataset, read_project
from pipelines.deploy import DeployConfig
from training.config import TrainConfig, train_needs, train_section


@dataclass(frozen=True)
class Project:
    """One project file's sections."""

    file: ProjectFile
    build: BuildConfig | None
    """None when the file has no build sections (a training-only file)."""
    train: TrainConfig | None
    """None when the file has no `train` section."""
    deploy: DeployConfig
    """The `deploy` section, or its defaults."""

    @property
    def dataset(self) -> str | None:
        """The dataset the build publishes ({store}/{name})."""
        return published_dataset(self.file)

    def need_build(self) -> BuildConfig:
        if self.build is None:
            raise ConfigError(f"{self.file.path}: sources: the file has no build sections "
                              "(sources, publish)")
        return self.build

    def need_train(self) -> TrainConfig:
        if self.train is None:
            raise ConfigError(f"{self.file.path}: train: the file has no train section")
        return self.train

    def needs(self, build: bool = True, train: bool = True) -> list[Need]:
        """Every file and model the build and the training (those asked for, where the file
        has them) will read."""
        needs = build_needs(self.build) if build and self.build else []
        return needs + (train_needs(self.train) if train and self.train else [])

    def preflight(self, build: bool = True, train: bool = True) -> Report:
        """`needs`, resolved once, with the COMET dtype checks and the memory plan; see
        `cpo_data.preflight`."""
        from cpo_data.memory_plan import plan

        build_config = self.build if build else None
        train_config = self.train if train else None
        report = check(self.needs(build, train))
        scorers = [(f"score.scorers[{i}]", s) for i, s in
                   enumerate(build_config.score.scorers if build_config else ())]
        if train_config is not None and train_config.eval.comet is not None:
            scorers.append(("train.eval.comet", train_config.eval.comet))
        report.problems += comet_dtype_problems(scorers)
        plan(build_config, train_config, report)
        return report

    def require_ready(self, build: bool = True, train: bool = True) -> None:
        """`preflight`, raising one error that lists every problem."""
        report = self.preflight(build, train)
        if not report.ok:
            raise PreflightError(report, str(self.file.path))


def load_project(path: str | Path) -> Project:
    """Read a project file once and check every section it has."""
    file = read_project(path)
    # `publish` alone may be there to name a training-only file's dataset.
    has_build = "sources" in file.data
    return Project(
        file=file,
        build=build_section(file) if has_build else None,
        train=train_section(file) if file.section("train") is not None else None,
        deploy=parse(DeployConfig, file.section("deploy") or {}, file, "deploy"),
    )
