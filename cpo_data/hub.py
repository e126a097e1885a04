"""Push a published version to a Hugging Face dataset repository.

The repository (or the branch `revision` names) then mirrors that version: its card
(`README.md`) is the repository's dataset card, so `load_dataset(repo_id)`,
`load_dataset(repo_id, "de-en")` and, when published, `load_dataset(repo_id, "conversational")`
read it as they read the version folder.

The tests run offline: they replace `HfApi.create_repo` / `create_branch` / `upload_folder` and
check what would be sent. The upload call itself is never exercised by them.
"""

from __future__ import annotations

import tempfile

from cpo_data import store

# A repository mirrors one version: files of an earlier push that this one does not bring
# (a language pair dropped since, old attachments) are deleted in the same commit.
# `.gitattributes` and other files (a user's own notes) are left alone.
STALE = ["*.parquet", store.MANIFEST, store.LEGACY_MANIFEST, store.REPO_YAML,
         f"{store.ATTACHMENTS_DIR}/*"]


def push_version(uri: str, repo_id: str, version: str = "latest", *, name: str | None = None,
                 private: bool = False, token: str | None = None, revision: str | None = None,
                 verify: bool = True) -> str:
    """Upload one version (`uri` is the dataset, or the store when `name` is given) to the
    dataset repository `repo_id`; return the commit's URL.

    Uploaded: every file the manifest lists (triplet Parquet files, the conversational ones,
    `__dropped__/`, the card, attachments) and the manifest. `__dropped__/` goes too: no config
    reads it, and with it the repository is the whole version, one that `cpo_data.read_dropped`
    and `read_triplets(..., verify=True)` read from a download as from the store. The files are
    first copied into a temporary folder (downloaded, for s3:// and other fsspec stores) and,
    with `verify`, checked against the manifest's sha256: a mismatch stops before anything
    reaches the Hub. A version published before cards gets one rendered from its manifest.
    `revision` pushes to that branch (created from main when missing); `private` applies when
    the repository is created.
    """
    from huggingface_hub import HfApi

    manifest = store.read_manifest(uri, version, name=name)
    version = manifest["version"]
    with tempfile.TemporaryDirectory(prefix="cpo-data-push-") as stage:
        store.export_version(uri, stage, version, name=name, verify=verify)
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        if revision is not None:
            api.create_branch(repo_id, branch=revision, repo_type="dataset", exist_ok=True)
        pairs = ", ".join(f"{p} {n}" for p, n in manifest["rows_per_lang_pair"].items())
        commit = api.upload_folder(
            repo_id=repo_id,
            repo_type="dataset",
            folder_path=stage,
            revision=revision,
            commit_message=f"cpo-data: {manifest['name']} version {version}",
            commit_description=(f"{manifest['rows']} triplets ({pairs}), published "
                                f"{manifest['created_at']}, schema version "
                                f"{manifest['schema_version']}. Files "
                                + ("checked against the manifest's sha256." if verify else
                                   "not checked against the manifest (verify=False).")),
            delete_patterns=STALE,
        )
    return str(commit)
