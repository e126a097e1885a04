"""What identifies a model's weights, for cache keys: cheap even for 40 GB checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cpo_data.errors import UserError

_HEAD_BYTES = 1 << 20


def folder_fingerprint(folder: Path) -> str:
    """Names, sizes and the first and last MiB of every file: cheap for 26 GB of weights, and
    a retrained or re-downloaded model still changes it."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(folder)}\0{size}\0".encode())
        with path.open("rb") as f:
            digest.update(f.read(_HEAD_BYTES))
            if size > 2 * _HEAD_BYTES:
                f.seek(-_HEAD_BYTES, os.SEEK_END)
                digest.update(f.read())
    return digest.hexdigest()[:32]


class HubUnreachable(UserError):
    """A hub repo's file that neither the HF cache nor the hub could provide."""


def hub_file(model: str, revision: str | None, filename: str) -> Path | None:
    """A small file (a few kB) of a hub repo: from the HF cache where it is, else downloaded
    into it; None when the repo has no such file. A path-like `model` that is no folder, or
    an id that is not one, is a `UserError` naming it."""
    if model.startswith((".", "/", "~")):
        raise UserError(f"folder {model} does not exist")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        LocalEntryNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(model, filename, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None:  # the cache knows the repo has no such file
            return None
        return Path(hf_hub_download(model, filename, revision=revision))
    except HFValidationError:
        raise UserError(f"{model!r} is neither a local folder nor a hub id (org/name)") from None
    except LocalEntryNotFoundError as error:  # offline: not "the repo has no such file"
        raise _unreachable(model, filename, error) from None
    except EntryNotFoundError:
        return None
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds; say which
        raise _unreachable(model, filename, error) from None


def _unreachable(model: str, filename: str, error: Exception) -> HubUnreachable:
    return HubUnreachable(
        f"cannot read {filename} of {model!r}: it is not a local folder and the Hugging "
        f"Face hub did not provide it ({type(error).__name__}: {error}). This machine may "
        "be offline (HF_HUB_OFFLINE, no network): download the model where there is a "
        "network and point `model` at the folder or the HF cache.")


def weights_fingerprint(model: str, revision: str | None, marker: str = "config.json") -> str:
    """What identifies a model's weights: a folder's content, or a hub repo's commit.

    The commit is that of the snapshot holding `marker` (a small file every such repo has),
    downloaded first when the repo is not cached yet, so the identity names the commit the
    weights will be loaded from, not a branch that would turn into a commit once the model is
    downloaded (which would move every cache entry and shard key of a first build). Only where
    the hub cannot be reached either does it fall back to the revision's name; the model
    cannot be loaded then anyway."""
    local = Path(model).expanduser()
    if local.is_dir():
        return f"folder:{folder_fingerprint(local)}"
    try:
        found = hub_file(model, revision, marker)
    except HubUnreachable:  # offline, gated: the load says which
        found = None
    if found is None:
        return f"hub:{model}@{revision or 'main'}"
    snapshot = found.parents[len(Path(marker).parts) - 1]  # .../snapshots/<commit>/
    return f"hub:{model}@{snapshot.name}"


def adapter_weights(adapter: str) -> str:
    """What identifies a LoRA adapter: a folder's content, or its hub repo's commit (peft
    repos carry `adapter_config.json`, not `config.json`)."""
    return weights_fingerprint(adapter, None, marker="adapter_config.json")


def generator_weights(config) -> str:  # noqa: ANN001 - a GeneratorConfig
    """The weights one configured generator uses: its model's, plus its adapter's."""
    weights = weights_fingerprint(config.model, config.revision)
    return weights + (f"+{adapter_weights(config.adapter)}" if config.adapter else "")


def comet_folder(model: str) -> str:
    """The folder that identifies a COMET model: for a checkpoint file, the model folder two
    levels up (`<model>/checkpoints/model.ckpt`, where COMET reads `<model>/hparams.yaml`);
    else `model` itself (a folder or a hub id)."""
    if not model.endswith(".ckpt"):
        return model
    checkpoint = Path(model).expanduser()
    if checkpoint.parent.name != "checkpoints":
        raise UserError(f"{model}: a COMET checkpoint sits in <model folder>/checkpoints/, "
                        "with the folder's hparams.yaml two levels up (as COMET saves it)")
    return str(checkpoint.parent.parent)


def scorer_weights(config) -> str | None:  # noqa: ANN001 - a ScorerConfig
    """The weights one configured scorer uses; None for metrics without any (chrF, BLEU)."""
    if config.kind != "comet" or not config.model:
        return None
    return weights_fingerprint(comet_folder(config.model), None,
                               marker="hparams.yaml")  # COMET repos have no config.json
