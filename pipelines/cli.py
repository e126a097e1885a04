"""The `cpo-data` command: build triplets, inspect published versions, train, run the demo."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cpo_data import store
from cpo_data.errors import UserError

# Imported where a command needs them, not here: `cpo-data --help`, `versions` and `inspect`
# never load torch, transformers or Prefect (seconds each).
if TYPE_CHECKING:
    import pandas as pd


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _short(text: str, width: int) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")


def print_versions(uri: str, name: str | None = None) -> None:
    versions = store.list_versions(uri, name=name)
    where = store.dataset_uri(uri, name) if name else uri
    if not versions:
        print(f"{where}: no published version")
        return
    print(f"{where}: {len(versions)} version(s), newest last")
    for manifest in versions:
        print(f"  {manifest['version']}  {manifest['created_at'][:19]}  "
              f"{manifest['rows']:>7} rows  {_counts(manifest['rows_per_lang_pair'])}")


def print_inspect(uri: str, version: str = "latest", name: str | None = None,
                  rows: int = 3) -> pd.DataFrame:
    """Print the versions, one version's counts and rows; return that version's triplets."""
    print_versions(uri, name)
    manifest = store.read_manifest(uri, version, name=name)
    path = store.version_path(uri, manifest["version"], name=name)
    print()
    print(f"version   {manifest['version']} (schema {manifest['schema_version']}, "
          f"created {manifest['created_at'][:19]})")
    print(f"folder    {path}")
    print(f"triplets  {manifest['rows']}: {_counts(manifest['rows_per_lang_pair'])}")
    print(f"dropped   {manifest['dropped_rows']}: {_counts(manifest['dropped_per_reason'])}")
    provenance = manifest.get("provenance", {})
    if "source_fingerprint" in provenance:
        print(f"sources   fingerprint {provenance['source_fingerprint'][:16]}, "
              f"files {', '.join(provenance.get('source_files', []))}")
    ingestion = provenance.get("ingestion")
    if ingestion:
        print(f"ingested  {ingestion['rows_read']} rows read, {ingestion['sources']} sources, "
              f"{ingestion['duplicates_collapsed']} duplicates collapsed, "
              f"{ingestion['empty_system_outputs']} empty provided outputs")
    truncated = provenance.get("truncated")
    if truncated:
        print(f"truncated generation: {_counts(truncated.get('generate', {}))}; scoring: "
              f"{_counts(truncated.get('score', {}))}")
    runs = store.list_runs(uri, manifest["version"], name=name)
    print(f"trained   {len(runs)} run(s) on this version" + (":" if runs else ""))
    for run in runs:
        held_out = run["eval"].get("eval/rewards/accuracies")
        print(f"  {run['created_at'][:19]}  {run['model_dir']}  {run['loss']}/{run['finetune']}"
              f", {run['steps']} steps, loss {run['metrics'].get('loss', float('nan')):.4f}"
              + (f", held-out accuracy {held_out:.2f}" if held_out is not None else ""))
    frame = store.read_triplets(uri, manifest["version"], name=name)
    if rows > 0:
        print(f"\nfirst {min(rows, len(frame))} row(s) of each language pair:")
        for pair, group in frame.groupby("lang_pair", sort=True):
            for row in group.head(rows).itertuples():
                print(f"  [{pair}] {_short(row.src, 90)}")
                print(f"      chosen   ({row.chosen_system}) {_short(row.chosen, 80)}")
                print(f"      rejected ({row.rejected_system}) {_short(row.rejected, 80)}")
    dataset = store.dataset_uri(uri, name) if name else uri
    print("\nopen it in pandas:")
    print(f"  import cpo_data; df = cpo_data.read_triplets({dataset!r})")
    print(f"  pd.read_parquet({path!r})")
    return frame


def _cmd_versions(args: argparse.Namespace) -> None:
    print_versions(args.uri, args.name)


def _run_manifest(path: str) -> Path | None:
    """The run manifest of a training run folder, or of the model folder inside one."""
    for folder in (Path(path), Path(path).parent):
        if (folder / "run_manifest.json").is_file():
            return folder / "run_manifest.json"
    return None


def print_run_lineage(manifest_path: Path) -> dict:
    """What produced a trained model: dataset version, sources, configs, results."""
    record = json.loads(manifest_path.read_text())
    print(f"run       {manifest_path.parent}")
    print(f"model     {record['model_dir']} ({record['finetune']} of {record['model']}, "
          f"{record['loss']}, {record['steps']} steps)")
    print(f"dataset   {record['dataset_uri']} version {record['dataset_version']} "
          f"({record['dataset_rows']} triplets)")
    print(f"sources   fingerprint {(record['source_fingerprint'] or 'unknown')[:16]}")
    print(f"configs   train: \"config\" in {manifest_path}; build: the version's manifest "
          f"(cpo-data inspect {record['dataset_uri']} --version {record['dataset_version']})")
    metrics = record["metrics"]
    if metrics:
        print(f"last step loss {metrics['loss']:.4f}, reward accuracy "
              f"{metrics['rewards/accuracies']:.2f}, margin {metrics['rewards/margins']:.4f}")
    if record["eval"]:
        print(f"held-out  loss {record['eval']['eval/loss']:.4f}, accuracy "
              f"{record['eval']['eval/rewards/accuracies']:.2f}")
    return record


def _cmd_inspect(args: argparse.Namespace) -> None:
    run_manifest = _run_manifest(args.uri) if "://" not in args.uri else None
    if run_manifest is not None:
        print_run_lineage(run_manifest)
    else:
        print_inspect(args.uri, args.version, args.name, args.rows)


def print_build_summary(summary: dict, rows: int) -> None:
    """The closing summary of a build: counts, drops, where the version is, how to open it."""
    print()
    print(f"==> published {summary['triplets']} triplets from {summary['sources']} sources "
          f"({summary['candidates']} candidates), version {summary['version']}")
    if summary["previous_version"]:
        print(f"sources         {summary['sources_new']} new since version "
              f"{summary['previous_version']}, {summary['sources_reused']} already in it")
    print(f"language pairs  {_counts(summary['lang_pairs'])}")
    print(f"dropped         {_counts(summary['dropped'])}")
    print(f"shards          {summary['shards']} ({summary['shards_reused']} reused from an "
          "earlier run)")
    if len(summary["workers"]) > 1:  # shards ran in several processes (Dask workers)
        print(f"workers         {len(summary['workers'])} processes ran shard tasks: "
              f"{_counts(summary['workers'])}")
    print(f"generated now   {_counts(summary['generated'])}; from cache "
          f"{_counts(summary['generated_from_cache'])}")
    print(f"scored now      {_counts(summary['scored'])}; from cache "
          f"{_counts(summary['scored_from_cache'])}")
    if summary["systems"]:
        print("chosen/rejected " + ", ".join(f"{s['system']} {s['chosen']}/{s['rejected']}"
                                             for s in summary["systems"]))
    agreement = summary["agreement"]
    if agreement and agreement["compared"]:
        print(f"human labels    the ranking score agrees on {agreement['agree']} of "
              f"{agreement['compared']} labelled sources "
              f"({agreement['agree'] / agreement['compared']:.0%})")
    margin = summary["score_summary"].get("margin", {})
    if margin.get("count"):
        print(f"margins         mean {margin['mean']:.4g}, min {margin['min']:.4g}, "
              f"max {margin['max']:.4g}")
    print()
    frame = print_inspect(summary["dataset_uri"], summary["version"], rows=rows)
    print("\npandas preview:")
    columns = ["lang_pair", "chosen_system", "rejected_system", "chosen_score",
               "rejected_score", "margin", "selected_by"]
    print(frame[columns].head().to_string())


# Without PREFECT_API_URL a flow starts Prefect's temporary server, which on a new PREFECT_HOME
# first creates and migrates its database: 14-16 s measured on an idle 2-core machine, 18.7 s
# beside two busy processes, against Prefect's default wait of 20 s; CI's run of the demo timed
# out ("Timed out while attempting to connect to ephemeral Prefect API server").
TEMPORARY_SERVER_WAIT_S = 120


@contextmanager
def _patient_temporary_server():
    """Wait up to TEMPORARY_SERVER_WAIT_S for Prefect's temporary server, unless the user runs
    their own server or chose the wait (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
        get_current_settings,
        temporary_settings,
    )

    chosen = "startup_timeout_seconds" in get_current_settings().server.ephemeral.model_fields_set
    if PREFECT_API_URL.value() or chosen:
        yield
        return
    with temporary_settings(
            updates={PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS: TEMPORARY_SERVER_WAIT_S}):
        yield


def _run_build(config, rows: int) -> None:
    from pipelines.build import build_triplets

    with _patient_temporary_server():
        summary = build_triplets(config)
    print_build_summary(summary, rows)


def _cmd_build(args: argparse.Namespace) -> None:
    from pipelines.project import load_project

    # Every section of the file is checked before Prefect starts (about 11 s).
    _run_build(load_project(args.config).need_build(), args.rows)


def _metric_rows(run_dir: Path) -> tuple[list[dict], list[dict]]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return ([m for m in lines if "loss" in m], [m for m in lines if "eval/loss" in m])


def print_training_summary(record: dict, table_rows: int = 8) -> None:
    """How the metrics moved over the run, held-out and test-set results, where the model is."""
    run_dir = Path(record["model_dir"]).parent
    steps, evals = _metric_rows(run_dir)
    print()
    print(f"==> trained {record['steps']} steps ({record['loss']}, {record['finetune']}) on "
          f"{record['dataset_uri']} version {record['dataset_version']}"
          + (f", resumed from step {record['resumed_from_step']}"
             if record["resumed_from_step"] else ""))
    if steps:
        every = max(1, len(steps) // table_rows)
        shown = steps[::every] + ([steps[-1]] if (len(steps) - 1) % every else [])
        print(f"{'step':>6} {'loss':>8} {'nll':>8} {'acc':>6} {'margin':>8} {'lr':>9} "
              f"{'tok/s':>8}")
        for m in shown:
            print(f"{m['step']:>6} {m['loss']:>8.4f} {m['nll_loss']:>8.4f} "
                  f"{m['rewards/accuracies']:>6.2f} {m['rewards/margins']:>8.4f} "
                  f"{m['learning_rate']:>9.2e} {m['tokens_per_second']:>8.0f}")
    for m in evals:
        print(f"held-out ({record['held_out_rows']} triplets) at step {m['step']}: loss "
              f"{m['eval/loss']:.4f}, accuracy {m['eval/rewards/accuracies']:.2f}, margin "
              f"{m['eval/rewards/margins']:.4f}")
    for model, pairs in (record["translation"] or {}).items():
        scores = "; ".join(f"{pair} " + ", ".join(
            f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
            for pair, s in pairs.items())
        print(f"test set ({model}): {scores}")
    for note in record["notes"]:
        print(f"note: {note}")
    print(f"model     {record['model_dir']}")
    print(f"metrics   {run_dir / 'metrics.jsonl'}")
    print(f"manifest  {run_dir / 'run_manifest.json'}")


def _run_train(config, version: str | None) -> None:
    from pipelines.train import train_cpo

    with _patient_temporary_server():
        record = train_cpo(config, version)
    print_training_summary(record)


def _cmd_train(args: argparse.Namespace) -> None:
    from pipelines.project import load_project

    config = load_project(args.config).need_train()
    # A missing dataset or version is named before Prefect's server starts (about 11 s).
    store.resolve_version(config.dataset, args.version or config.version)
    _run_train(config, args.version)


def _cmd_serve(args: argparse.Namespace) -> None:
    from pipelines import deploy

    deploy.serve(args.config)


def _cmd_demo(args: argparse.Namespace) -> None:
    from pipelines import demo

    print(f"==> demo: {demo.DEMO_CONFIG}")
    build_config, train_config = demo.demo_configs(args.store)
    _run_build(build_config, args.rows)
    if not args.skip_training:
        print("\n==> demo training: a short CPO run with a tiny local model")
        demo.ensure_demo_model(train_config.model)
        _run_train(train_config, None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpo-data",
        description="Build machine-translation preference data and train on it.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    versions = commands.add_parser("versions", help="list the published versions of a dataset")
    versions.add_argument("uri", help="dataset URI ({store}/{name}), or the store with --name")
    versions.add_argument("--name", help="dataset name inside the store at URI")
    versions.set_defaults(run=_cmd_versions)

    inspect = commands.add_parser("inspect", help="versions, counts, a few rows and the runs "
                                  "trained on them; or, for a training run, what produced it")
    inspect.add_argument("uri", help="dataset URI ({store}/{name}), the store with --name, or "
                         "a training run's folder (or its final/ model)")
    inspect.add_argument("--version", default="latest", help="version id (default: latest)")
    inspect.add_argument("--name", help="dataset name inside the store at URI")
    inspect.add_argument("--rows", type=int, default=3, help="rows to show per language pair")
    inspect.set_defaults(run=_cmd_inspect)

    build = commands.add_parser("build", help="build and publish triplets from a YAML config")
    build.add_argument("config", help="build config (YAML), e.g. configs/demo.yaml")
    build.add_argument("--rows", type=int, default=2, help="rows to show per language pair")
    build.set_defaults(run=_cmd_build)

    train = commands.add_parser("train", help="train on a published version (the YAML's "
                                "train section)")
    train.add_argument("config", help="config (YAML) with a train section, e.g. "
                       "configs/demo.yaml")
    train.add_argument("--version", help="dataset version (default: the config's, latest)")
    train.set_defaults(run=_cmd_train)

    serve = commands.add_parser(
        "serve", help="serve the build on the config's schedule and the training on each "
        "published version (needs a Prefect server: PREFECT_API_URL)")
    serve.add_argument("config", help="config (YAML) with publish, train and deploy sections")
    serve.set_defaults(run=_cmd_serve)

    demo = commands.add_parser("demo", help="run the offline demo on the demo corpus")
    demo.add_argument("--store", help="store URI to publish into (default: .cpo-data/store)")
    demo.add_argument("--rows", type=int, default=2, help="rows to show per language pair")
    demo.add_argument("--skip-training", action="store_true",
                      help="stop after publishing the triplets")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import pandas as pd

    pd.set_option("display.width", 120)
    try:
        args.run(args)
    except UserError as error:  # input, config or environment: one line, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def console() -> None:
    """The `cpo-data` console script: `main()`, then exit without interpreter teardown.

    pyarrow 21 sometimes aborts a finished process during teardown ("terminate called without
    an active exception", exit 134; apache/arrow#34314): seen here in 1-3% of short processes
    under load. The work is done and flushed by then; `os._exit` keeps the exit code honest.
    The exit hooks are run first, by hand, so that Prefect stops the temporary server it
    started for a build instead of leaving it running.
    """
    import atexit
    import logging
    import os

    code = main()
    # Flush log handlers first (Prefect's sends the run's logs to its server), then the exit
    # hooks, one of which stops the temporary server Prefect started for a build.
    logging.shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    console()
