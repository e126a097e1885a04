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
    """What identifies a model's weights: a folder's content, or a hub repo's commit (read
    from where the HF cache holds `marker`, a file every such repo has)."""
    local = Path(model).expanduser()
    if local.is_dir():
        return f"folder:{folder_fingerprint(local)}"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(model, marker, revision=revision)
    if isinstance(cached, str):  # .../snapshots/<commit>/<marker>
        snapshot = Path(cached).parents[len(Path(marker).parts) - 1]
        return f"hub:{model}@{snapshot.name}"
    return f"hub:{model}@{revision or 'main'}"


def generator_weights(config) -> str:  # noqa: ANN001 - a GeneratorConfig
    """The weights one configured generator uses: its model's, plus its adapter's."""
    weights = weights_fingerprint(config.model, config.revision)
    return weights + (f"+{weights_fingerprint(config.adapter, None)}" if config.adapter else "")


def scorer_weights(config) -> str | None:  # noqa: ANN001 - a ScorerConfig
    """The weights one configured scorer uses; None for metrics without any (chrF, BLEU). A
    `.ckpt` path stands for the checkpoint's model folder (two levels up)."""
    if config.kind != "comet" or not config.model:
        return None
    model = config.model
    if model.endswith(".ckpt"):
        model = str(Path(model).expanduser().parent.parent)
    return weights_fingerprint(model, None, marker="hparams.yaml")  # COMET repos: no config.json
