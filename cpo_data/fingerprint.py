"""What identifies a model's weights, for cache keys: cheap even for 40 GB checkpoints."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

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


def weights_fingerprint(model: str, revision: str | None, marker: str = "config.json") -> str:
    """What identifies a model's weights: a folder's content, or a hub repo's commit.

    The commit is read from where the HF cache holds `marker` (a small file every such repo
    has). A repo not cached yet has `marker` downloaded first (a few kB), so the identity names
    the commit the weights will be loaded from, not a branch that would turn into a commit once
    the model is downloaded (which would move every cache entry and shard key of a first build).
    Only where the hub cannot be reached either does it fall back to the revision's name; the
    model cannot be loaded then anyway."""
    local = Path(model).expanduser()
    if local.is_dir():
        return f"folder:{folder_fingerprint(local)}"
    if model.startswith((".", "/", "~")):
        from cpo_data.errors import UserError

        raise UserError(f"folder {model} does not exist")
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        cached = try_to_load_from_cache(model, marker, revision=revision)
        if not isinstance(cached, str):
            cached = hf_hub_download(model, marker, revision=revision)
    except HFValidationError:
        from cpo_data.errors import UserError

        raise UserError(f"{model!r} is neither a local folder nor a hub id (org/name)") from None
    except Exception:  # noqa: BLE001 - offline, gated, missing: the load says which
        return f"hub:{model}@{revision or 'main'}"
    snapshot = Path(cached).parents[len(Path(marker).parts) - 1]  # .../snapshots/<commit>/
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
        from cpo_data.errors import UserError

        raise UserError(f"{model}: a COMET checkpoint sits in <model folder>/checkpoints/, "
                        "with the folder's hparams.yaml two levels up (as COMET saves it)")
    return str(checkpoint.parent.parent)


def scorer_weights(config) -> str | None:  # noqa: ANN001 - a ScorerConfig
    """The weights one configured scorer uses; None for metrics without any (chrF, BLEU)."""
    if config.kind != "comet" or not config.model:
        return None
    return weights_fingerprint(comet_folder(config.model), None,
                               marker="hparams.yaml")  # COMET repos have no config.json
