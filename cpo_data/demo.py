"""The offline demo: the demo corpus in, a published version of triplets out.

For now the pairs come from the corpus's human labels; the generation and scoring stages join
the demo as they land.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from cpo_data import __version__, select, sources, store
from cpo_data.config import BuildConfig, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


@dataclass
class PublishedBuild:
    """What a build published, and what it read and left out on the way."""

    dataset_uri: str
    version: str
    triplets: int
    dropped: int
    report: sources.SourcesReport


def build_from_labels(config: BuildConfig) -> PublishedBuild:
    """Ingest the sources, pair outputs by their human labels, publish one version."""
    loaded = sources.load_sources(config.sources)
    selection = select.select_triplets(loaded.table, None, None, config.select, rank_by=None)
    triplets, dropped = selection.triplets, selection.dropped
    provenance = {
        "cpo_data_version": __version__,
        "config": dataclasses.asdict(config),
        "source_files": loaded.report.files,
        "source_fingerprint": sources.fingerprint(loaded.table),
        "selection": "human_label",
    }
    version = store.publish_triplets(triplets, config.publish.uri, config.publish.name,
                                     provenance, dropped=dropped)
    return PublishedBuild(
        dataset_uri=store.dataset_uri(config.publish.uri, config.publish.name),
        version=version, triplets=triplets.num_rows, dropped=dropped.num_rows,
        report=loaded.report,
    )


def demo_config(store_uri: str | None = None) -> BuildConfig:
    """The demo's config, optionally publishing somewhere else."""
    config = load_config(DEMO_CONFIG)
    if store_uri is not None:
        publish = dataclasses.replace(config.publish, uri=store_uri)
        config = dataclasses.replace(config, publish=publish)
    return config
