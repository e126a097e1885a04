"""What the `cpo-data` commands print: versions, a version's contents and lineage, build and
training summaries, the preflight's findings. Kept apart from the argument handling in
`pipelines.cli`; like it, it imports no torch, transformers or Prefect.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

from cpo_data import store

if TYPE_CHECKING:
    import pandas as pd


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _short(text: str, width: int) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder=" ...")


def _vetoes(counts: dict[str, int], checked: int) -> str:
    """The guards' vetoes, out of how many candidates they checked."""
    vetoed = sum(counts.values())
    return (f"{vetoed} of {checked} candidates by the guards"
            + (f": {_counts(counts)}" if vetoed else ""))


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
    if "vetoes" in provenance:  # versions built before the guards have no such entry
        print(f"vetoed    {_vetoes(provenance['vetoes'], provenance.get('guarded', 0))}")
    from cpo_data.report import published_report

    report = published_report(manifest)
    if report:
        print(f"report    {path}/{report}")
    if "min_margin" in provenance:
        print(f"margin    pairs kept at {provenance['rank_by']} margin >= "
              f"{provenance['min_margin']:g}")
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


def run_manifest_path(path: str) -> Path | None:
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


def print_build_summary(summary: dict, rows: int) -> None:
    """The closing summary of a build: counts, drops, where the version is, how to open it."""
    print()
    if summary.get("unchanged"):
        print(f"==> unchanged: {summary['triplets']} triplets from {summary['sources']} "
              f"sources ({summary['candidates']} candidates) equal version "
              f"{summary['version']}; nothing published")
    else:
        print(f"==> published {summary['triplets']} triplets from {summary['sources']} "
              f"sources ({summary['candidates']} candidates), version {summary['version']}")
    if summary["previous_version"]:
        print(f"sources         {summary['sources_new']} new since version "
              f"{summary['previous_version']}, {summary['sources_reused']} already in it")
    print(f"language pairs  {_counts(summary['lang_pairs'])}")
    print(f"vetoed          {_vetoes(summary['vetoed'], summary['guarded'])}")
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
    for name, counts in summary.get("requests", {}).items():
        print(f"requests        {name}: {counts.get('sent', 0)} sent, "
              f"{counts.get('retried', 0)} retried, {counts.get('failed', 0)} failed; tokens "
              f"{counts.get('prompt_tokens', 0)} prompt + "
              f"{counts.get('completion_tokens', 0)} completion")
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
              f"max {margin['max']:.4g}; kept at >= {summary['min_margin']:g}")
    print()
    frame = print_inspect(summary["dataset_uri"], summary["version"], rows=rows)
    print("\npandas preview:")
    columns = ["lang_pair", "chosen_system", "rejected_system", "chosen_score",
               "rejected_score", "margin", "selected_by"]
    print(frame[columns].head().to_string())


def print_preflight(report) -> None:  # noqa: ANN001 - a cpo_data.preflight.Report
    """What each need resolved to, the memory plan, then every problem."""
    from cpo_data.memory_plan import human_bytes

    for found in report.found:
        where = found.where + (f" @{found.commit[:12]}" if found.commit else "")
        notes = [n for n in (human_bytes(found.size), found.gated and f"gated ({found.gated})",
                             found.license and f"licence {found.license}") if n]
        print(f"  {', '.join(found.keys)}: {found.name}  [{where or 'not found'}]"
              + (f"  {', '.join(notes)}" if notes else ""))
    if report.memory:
        print("memory plan (weights only; a stage releases the one before it on its device):")
        for line in report.memory:
            print(f"  {line}")
    print(f"{len(report.problems)} problem(s)" + (":" if report.problems else ""))
    for problem in report.problems:
        print(f"  {problem}")


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


def print_demo_closing(summary: dict, trained: bool) -> None:
    """What the demo's numbers mean, where the real recipe is, and (last) where the version
    is: a newcomer reads the end first."""
    print("\n==> what the demo shows: the wiring, not translation quality")
    print("  The pairs come from two provided systems ranked by chrF against the reference;")
    print("  the 'human labels' line above says how often chrF agreed with people.")
    if trained:
        print("  The trained model is a tiny Llama with random weights and a 120-step run: its")
        print("  held-out accuracy and test-set chrF/BLEU move by chance, up or down.")
    print("  The real recipe (ALMA-13B-LoRA candidates, CometKiwi-XXL + XCOMET-XXL, CPO on a GPU)")
    print("  is configs/alma-r.yaml: `cpo-data check configs/alma-r.yaml` says what it needs")
    print("  (README, 'Running it for real').")
    print(f"version   {store.version_path(summary['dataset_uri'], summary['version'])}")
    if summary.get("report"):
        print(f"report    {summary['report']}")
