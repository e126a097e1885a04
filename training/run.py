"""A training run as plain stages: read a published version, train, evaluate, write the run
manifest. `pipelines/train.py` wires the same stages as a Prefect flow.

A run lives in `{output_dir}/{version}/`; its `run_manifest.json` records which dataset
version, source fingerprint and config produced the model in `final/`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cpo_data import store
from cpo_data.errors import UserError
from training import distributed
from training.config import TrainConfig
from training.loop import TrainingError, TrainResult, train

log = logging.getLogger("cpo_data.training")

RUN_MANIFEST = "run_manifest.json"
RUN_FORMAT = "cpo-data-training-run"


def load_dataset(config: TrainConfig, version: str | None = None) -> tuple[dict, list[dict]]:
    """The manifest and triplet rows of the version to train on (default: `config.version`).

    A missing version or dataset raises `StoreError`, a version that fails validation
    `SchemaError`, an empty one `TrainingError`; each names the dataset and version."""
    manifest = store.read_manifest(config.dataset, version or config.version)
    # verify: a file changed since publishing would train on data the manifest does not vouch for
    frame = store.read_triplets(config.dataset, manifest["version"], verify=True)
    if frame.empty:
        raise TrainingError(f"{config.dataset} version {manifest['version']}: has no triplets "
                            "to train on")
    warning = selection_metric_warning(config, manifest)
    if warning and distributed.is_main():
        log.warning(warning)
    return manifest, frame[["id", "prompt", "chosen", "rejected"]].to_dict("records")


def selection_metric_warning(config: TrainConfig, manifest: dict) -> str | None:
    """A warning when the test set is scored with a COMET model that also selected the data:
    selecting with a neural metric inflates that metric (and its relatives) on the model
    trained on the selection (Kovacs et al. 2024, arXiv 2411.03524). None otherwise."""
    from cpo_data.fingerprint import scorer_weights

    scorer = config.eval.comet
    if scorer is None or not scorer.model:
        return None
    provenance = manifest.get("provenance", {})
    built = [s for s in provenance.get("config", {}).get("score", {}).get("scorers", [])
             if s.get("kind", "comet") == "comet" and s.get("model")]
    weights = provenance.get("scorers", [])
    try:
        mine = scorer_weights(scorer)
    except UserError:  # the evaluation itself will say what is wrong with the model
        return None
    same = [s["name"] for s, w in zip(built, weights, strict=False)
            if w == mine or s["model"] == scorer.model]
    if not same:
        return None
    return (f"train.eval.comet ({scorer.name}: {scorer.model}) is the COMET model that "
            f"selected this version's pairs (score.scorers {', '.join(same)}): its test-set "
            "score will flatter the trained model; evaluate with another metric too (Kovacs "
            "et al. 2024, arXiv 2411.03524)")


def run_dir(config: TrainConfig, manifest: dict) -> Path:
    return Path(config.output_dir) / manifest["version"]


def train_on(config: TrainConfig, manifest: dict, rows: list[dict],
             progress: bool = True, on_step=None) -> TrainResult:
    """Train on one dataset version; its id goes into every checkpoint."""
    return train(config, rows, run_dir(config, manifest), progress=progress, on_step=on_step,
                 manifest={"dataset_uri": config.dataset,
                           "dataset_version": manifest["version"]})


def write_run_manifest(config: TrainConfig, manifest: dict, result: TrainResult,
                       translation: dict | None) -> dict[str, Any]:
    """`run_manifest.json`: what produced the model in `final/`, and how it scored.

    Written to a temporary name and renamed, so a reader sees the whole file or none."""
    provenance = manifest.get("provenance", {})
    record = {
        "format": RUN_FORMAT,
        "created_at": datetime.now(UTC).isoformat(),
        "dataset_uri": config.dataset,
        "dataset_version": manifest["version"],
        "dataset_rows": manifest["rows"],
        "source_fingerprint": provenance.get("source_fingerprint"),
        "model": config.model,
        "model_dir": result.model_dir,
        "finetune": config.finetune,
        "loss": config.loss,
        "steps": result.steps,
        "resumed_from_step": result.resumed_from_step,
        "train_rows": result.train_rows,
        "held_out_rows": result.held_out_rows,
        "truncated": result.truncated,
        "left_out": result.left_out,
        "metrics": result.last_metrics,
        "eval": result.eval_metrics,
        "translation": translation,
        "notes": result.notes,
        "config": json.loads(json.dumps(dataclasses.asdict(config))),
    }
    path = Path(result.run_dir) / RUN_MANIFEST
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(record, indent=2))
    partial.replace(path)
    # And the other direction of the lineage: from the version to the runs trained on it.
    store.register_run(config.dataset, manifest["version"], {
        key: record[key] for key in ("created_at", "model", "model_dir", "finetune", "loss",
                                     "steps", "metrics", "eval")} | {
        "run_dir": result.run_dir, "run_manifest": str(path)})
    return record


def run_training(config: TrainConfig, version: str | None = None,
                 progress: bool = True) -> dict[str, Any] | None:
    """The whole run without Prefect: read, train, evaluate, record.

    Launched as several processes, all read the version and train together; rank 0 alone then
    translates the test set and writes the run manifest (returned; None on the others)."""
    from training.evaluate import translation_quality

    manifest, rows = load_dataset(config, version)
    result = train_on(config, manifest, rows, progress)
    if not distributed.is_main():
        return None
    translation = (translation_quality(config, result.model_dir)
                   if config.eval.test_set is not None else None)
    return write_run_manifest(config, manifest, result, translation)
