"""The training flow: a published triplet version -> CPO/ORPO training -> evaluation -> manifest.

    from pipelines.train import train_cpo
    record = train_cpo("configs/demo.yaml")               # the latest version
    record = train_cpo("configs/demo.yaml", version="20261122T101500-1a2b3c")

The stages are plain functions in `training/run.py`; this module only wires them as tasks.
With `train.processes` above 1 the run goes to torchrun (`training/launch.py`), one process
per GPU, as one task. No task is cached (nor are its inputs hashed, which for a large version
would cost time): a rerun of the same version continues from the run folder's newest
checkpoint (`train.checkpoints.resume`), so a crashed or cancelled run loses at most
`checkpoints.every_steps` steps.
On success the flow creates a metrics artifact and emits `cpo_data.training.completed`.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import emit_event

from pipelines.build import artifact_key
from training import run as stages
from training.config import TrainConfig
from training.loop import TrainResult

COMPLETED_EVENT = "cpo_data.training.completed"
_LOGGED = ("loss", "nll_loss", "rewards/accuracies", "rewards/margins", "learning_rate",
           "tokens_per_second")


@task(name="load-triplets", cache_policy=NO_CACHE)
def load_triplets(config: TrainConfig, version: str | None) -> tuple[dict, list[dict]]:
    manifest, rows = stages.load_dataset(config, version)
    get_run_logger().info("%s version %s: %d triplets", config.dataset, manifest["version"],
                          len(rows))
    return manifest, rows


@task(name="train", cache_policy=NO_CACHE)
def train_model(config: TrainConfig, manifest: dict, rows: list[dict]) -> TrainResult:
    logger = get_run_logger()

    def report(step: int, metrics: dict[str, float]) -> None:
        # The UI shows the run's logs; every tenth step keeps them readable on long runs.
        if step == 1 or step % 10 == 0:
            logger.info("step %d: %s", step, ", ".join(
                f"{name} {metrics[name]:.4g}" for name in _LOGGED))

    result = stages.train_on(config, manifest, rows, progress=True, on_step=report)
    for note in result.notes:
        logger.warning(note)
    return result


@task(name="train-on-processes", cache_policy=NO_CACHE)
def train_on_processes(config: TrainConfig, version: str | None) -> dict:
    """The whole run (train, evaluate, record) on `config.processes` GPUs through torchrun;
    the processes read and verify the version themselves."""
    from cpo_data import store
    from training.launch import train_launched

    version = store.read_manifest(config.dataset, version or config.version)["version"]
    logger = get_run_logger()
    logger.info("%s version %s on %d processes", config.dataset, version, config.processes)
    return train_launched(config, version, logger.info)


@task(name="evaluate-translations", cache_policy=NO_CACHE)
def evaluate_translations(config: TrainConfig, model_dir: str) -> dict:
    from training.evaluate import translation_quality

    return translation_quality(config, model_dir)


@task(name="write-run-manifest", cache_policy=NO_CACHE)
def write_run_manifest(config: TrainConfig, manifest: dict, result: TrainResult,
                       translation: dict | None) -> dict:
    return stages.write_run_manifest(config, manifest, result, translation)


def create_artifact(record: dict[str, Any], name: str) -> None:
    """The run's closing metrics in the Prefect UI."""
    table = [{"metric": k, "value": v} for k, v in record["metrics"].items()]
    table += [{"metric": k, "value": v} for k, v in record["eval"].items()]
    for model, pairs in (record["translation"] or {}).items():
        for pair, scores in pairs.items():
            table += [{"metric": f"{model}/{pair}/{k}", "value": v} for k, v in scores.items()]
    create_table_artifact(
        key=artifact_key(name, "training"), table=table,
        description=f"Training on {record['dataset_uri']} version {record['dataset_version']}: "
        f"{record['steps']} steps, model in {record['model_dir']}")


@flow(name="cpo-data-train", validate_parameters=False)
def train_cpo(config: str | TrainConfig, version: str | None = None) -> dict:
    """Train on one published version (default: the config's `version`, normally `latest`)
    and return the run manifest as a dict."""
    if not isinstance(config, TrainConfig):
        from pipelines.project import load_project

        config = load_project(config).need_train()
    if config.processes > 1:
        record = train_on_processes(config, version)
    else:
        manifest, rows = load_triplets(config, version)
        result = train_model(config, manifest, rows)
        translation = (evaluate_translations(config, result.model_dir)
                       if config.eval.test_set is not None else None)
        record = write_run_manifest(config, manifest, result, translation)
    name = config.dataset.rstrip("/").rsplit("/", 1)[-1]
    create_artifact(record, name)
    emit_event(event=COMPLETED_EVENT,
               resource={"prefect.resource.id": f"cpo-data.dataset.{name}",
                         "prefect.resource.name": name},
               payload={"dataset_uri": record["dataset_uri"],
                        "version": record["dataset_version"], "model_dir": record["model_dir"]})
    return record
