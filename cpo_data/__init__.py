"""cpo-data: machine-translation preference data (chosen/rejected triplets) and CPO training.

Public API (stable import paths):

    cpo_data.read_triplets(uri, version="latest", format="standard") -> pandas.DataFrame
    cpo_data.publish_triplets(table, uri, name, provenance) -> version id
    cpo_data.list_versions(uri), cpo_data.read_manifest(uri, version)
    cpo_data.push_version(uri, repo_id, version="latest") -> commit URL (Hugging Face Hub)
    cpo_data.load_sources(SourcesConfig(...)) -> Sources
    cpo_data.load_config(path) -> BuildConfig
"""

from cpo_data.config import BuildConfig, PublishConfig, SelectConfig, SourcesConfig, load_config
from cpo_data.hub import push_version
from cpo_data.schema import SCHEMA_VERSION, SchemaError, validate
from cpo_data.sources import SourceError, Sources, load_sources
from cpo_data.store import (
    StoreError,
    list_versions,
    publish_triplets,
    read_dropped,
    read_manifest,
    read_triplets,
    version_path,
)

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "BuildConfig",
    "PublishConfig",
    "SchemaError",
    "SelectConfig",
    "SourceError",
    "Sources",
    "SourcesConfig",
    "StoreError",
    "list_versions",
    "load_config",
    "load_sources",
    "publish_triplets",
    "push_version",
    "read_dropped",
    "read_manifest",
    "read_triplets",
    "validate",
    "version_path",
]
