"""Preflight: every file and model a run will need, checked at once before any work starts.

A run names its needs (`Need`: a source file, a model, an adapter, a COMET checkpoint, each
under the config key that asked for it); `check(needs)` resolves each distinct one once and
returns what it found and every problem, so a user fixes them all in one go instead of one per
run, minutes in. A local folder must hold the files its loader reads; a hub id is resolved to
the commit it will load from: through the Hugging Face hub's metadata when it is reachable
(gated or not, licence, size, files), from the Hugging Face cache alone under HF_HUB_OFFLINE.
A COMET model also needs the encoder its `hparams.yaml` names (`pretrained_model`): COMET
rebuilds the encoder from that repo's config and tokenizer, so it is a need of its own.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cpo_data.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
           "pytorch_model.bin.index.json")
TOKENIZER = ("tokenizer.json", "tokenizer.model", "sentencepiece.bpe.model", "spiece.model",
             "source.spm", "vocab.json", "vocab.txt")


@dataclass(frozen=True)
class Layout:
    """The files a loader reads from a model folder or repo: each of `required`, and at least
    one of each group in `one_of`."""

    required: tuple[str, ...]
    one_of: tuple[tuple[str, ...], ...] = ()

    @property
    def marker(self) -> str:
        """A small file every such repo has: its cache entry names the snapshot's commit."""
        return self.required[0]


LAYOUTS = {
    "model": Layout(("config.json",), (WEIGHTS, TOKENIZER)),
    "adapter": Layout(("adapter_config.json",),
                      (("adapter_model.safetensors", "adapter_model.bin"),)),
    "comet": Layout(("hparams.yaml", "checkpoints/model.ckpt")),
    # COMET builds the encoder from its config and tokenizer; the weights come from the COMET
    # checkpoint, so the encoder's own weights are not needed.
    "comet encoder": Layout(("config.json",), (TOKENIZER,)),
}


@dataclass(frozen=True)
class Need:
    """One thing a run will read: `kind` is "file" or a key of LAYOUTS; `name` a path or a hub
    id; `key` the config key that asks for it (named in every problem)."""

    key: str
    kind: str
    name: str
    revision: str | None = None


@dataclass
class Found:
    """What one need resolved to."""

    keys: list[str]
    kind: str
    name: str
    where: str = ""
    """folder, file, cache (the Hugging Face cache, offline) or hub."""
    commit: str | None = None
    gated: str | None = None
    license: str | None = None
    size: int | None = None
    """Bytes of the files it lists (a hub repo: all its files; a folder: its files)."""
    files: dict[str, int] = field(default_factory=dict)
    """Its files and their sizes, where known."""
    local: Path | None = None
    """The folder holding it on this machine (a folder, or the cached snapshot)."""


@dataclass
class Report:
    found: list[Found] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    """One line per problem, each starting with the config key(s)."""
    memory: list[str] = field(default_factory=list)
    """The memory plan: what each stage holds on each device (`cpo_data.memory_plan`)."""

    def by_key(self, key: str) -> Found | None:
        return next((f for f in self.found if key in f.keys), None)

    @property
    def ok(self) -> bool:
        return not self.problems


class PreflightError(UserError):
    """Problems found before any work started; the message lists every one."""

    def __init__(self, report: Report, where: str) -> None:
        self.report = report
        lines = "\n".join(f"  {p}" for p in report.problems)
        super().__init__(f"{where}: {len(report.problems)} problem(s) before any work "
                         f"started:\n{lines}")


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _layout_problems(layout: Layout, exists: Callable[[str], bool]) -> list[str]:
    missing = [f for f in layout.required if not exists(f)]
    for group in layout.one_of:
        if not any(exists(f) for f in group):
            missing.append(" or ".join(group))
    return [f"missing {', '.join(missing)}"] if missing else []


def _shard_problems(folder: Path) -> list[str]:
    """A sharded checkpoint lists its shards in an index; a half-copied folder lacks some."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
            missing = sorted(s for s in shards if not (folder / s).exists())
            if missing:
                return [f"{index} lists {len(shards)} shards, {len(missing)} missing "
                        f"({', '.join(missing[:3])})"]
    return []


def _folder_files(folder: Path) -> dict[str, int]:
    """Each file's path in the folder and size (a cache snapshot's links resolved)."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file()}


def _folder_size(folder: Path) -> int:
    return sum(_folder_files(folder).values())


def _check_folder(need: Need, found: Found) -> list[str]:
    folder = Path(need.name).expanduser()
    if not folder.is_dir():
        return [f"{need.name} does not exist" if not folder.exists()
                else f"{need.name} is not a folder"]
    found.where, found.files, found.local = "folder", _folder_files(folder), folder
    found.size = sum(found.files.values())
    layout = LAYOUTS[need.kind]
    return (_layout_problems(layout, lambda f: (folder / f).exists())
            or _shard_problems(folder))


def _cached_snapshot(need: Need) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    marker = LAYOUTS[need.kind].marker
    try:
        cached = try_to_load_from_cache(need.name, marker, revision=need.revision)
    except ValueError:  # not a valid repo id: the hub path says so
        return None
    if not isinstance(cached, str):
        return None
    return Path(cached).parents[len(Path(marker).parts) - 1]  # .../snapshots/<commit>/


def _check_cache(need: Need, found: Found) -> list[str]:
    snapshot = _cached_snapshot(need)
    if snapshot is None:
        return [f"{need.name} is not in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
                "fetch it where there is a network (`cpo-data download CONFIG`)"]
    found.where, found.commit, found.local = "cache", snapshot.name, snapshot
    found.files = _folder_files(snapshot)
    found.size = sum(found.files.values())
    # A file whose download broke leaves a link to a missing blob: exists() is False.
    layout = LAYOUTS[need.kind]
    problems = _layout_problems(layout, lambda f: (snapshot / f).exists())
    return [f"{p} in the cached snapshot {snapshot.name[:12]}" for p in problems] or (
        _shard_problems(snapshot))


def _licence(info) -> str | None:  # noqa: ANN001 - huggingface_hub's ModelInfo
    card = getattr(info, "card_data", None)
    if card is not None and getattr(card, "license", None):
        return str(card.license)
    tags = [t for t in (info.tags or []) if t.startswith("license:")]
    return tags[0].removeprefix("license:") if tags else None


def _check_hub(need: Need, found: Found) -> list[str]:
    from huggingface_hub import HfApi, auth_check
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    revision = f" at revision {need.revision}" if need.revision else ""
    try:
        info = HfApi().model_info(need.name, revision=need.revision, files_metadata=True)
    except HFValidationError:
        return [f"{need.name!r} is neither a local folder nor a hub id (org/name)"]
    except RevisionNotFoundError:
        return [f"{need.name} has no revision {need.revision!r} on the hub"]
    except GatedRepoError:  # a subclass of the next; its metadata is refused too
        return [_gated(need.name, None)]
    except RepositoryNotFoundError:
        return [f"{need.name}: no such model on the hub (a private one needs HF_TOKEN)"]
    except Exception as error:  # noqa: BLE001 - network errors come in many kinds
        if _cached_snapshot(need) is not None:  # the cache can still serve the run
            log.warning("%s: the hub did not answer (%s); checking the cache", need.name, error)
            return _check_cache(need, found)
        return [f"{need.name}{revision}: the hub did not answer ({type(error).__name__}: "
                f"{error}) and it is not in the Hugging Face cache"]
    found.where, found.commit, found.license = "hub", info.sha, _licence(info)
    found.gated = str(info.gated) if info.gated else None
    files = {s.rfilename: s.size or 0 for s in info.siblings or []}
    found.files = files
    found.size = sum(size or 0 for size in files.values())
    problems = [f"{p} in the repo{revision}"
                for p in _layout_problems(LAYOUTS[need.kind], files.__contains__)]
    if info.gated:
        try:
            auth_check(need.name)
        except GatedRepoError:
            problems.append(_gated(need.name, found.license))
    return problems


def _gated(name: str, licence: str | None) -> str:
    licence = f" (licence {licence})" if licence else ""
    return (f"{name} is gated{licence}: accept its terms at https://huggingface.co/{name} "
            "and set HF_TOKEN")


def _comet_encoder(need: Need) -> Need | None:
    """The encoder repo a COMET model's hparams.yaml names, as a need of its own (None where
    the hparams cannot be read: the model's own line says why)."""
    from cpo_data.config_score import comet_hparams

    encoder = (comet_hparams(need.name, download=True) or {}).get("pretrained_model")
    return Need(f"{need.key} (its encoder)", "comet encoder", str(encoder)) if encoder else None


def _resolve(need: Need, found: Found, offline: bool) -> list[str]:

    if need.kind == "file":
        if "://" in need.name:  # fsspec URIs are read by the run itself
            found.where = "uri"
            return []
        path = Path(need.name).expanduser()
        if not path.exists():
            return [f"{need.name} does not exist"]
        found.where = "file"
        found.size = path.stat().st_size if path.is_file() else _folder_size(path)
        return []
    if need.kind == "comet" and need.name.endswith(".ckpt"):
        from cpo_data.fingerprint import comet_folder

        try:
            need = Need(need.key, need.kind, comet_folder(need.name), need.revision)
        except UserError as error:
            return [str(error)]
    if _is_local(need.name):
        return _check_folder(need, found)
    if offline:
        return _check_cache(need, found)
    return _check_hub(need, found)


def check(needs: Sequence[Need], offline: bool | None = None) -> Report:
    """Resolve each distinct need once (a model two sections name is one), then the encoders
    the COMET models name; every problem is a line naming the config key(s). Hub ids are
    looked up on the hub, or only in the Hugging Face cache when `offline` (default:
    HF_HUB_OFFLINE)."""
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE if offline is None else offline
    report = Report()
    pending = list(needs)
    while pending:
        distinct: dict[tuple[str, str, str | None], list[Need]] = {}
        for need in pending:
            distinct.setdefault((need.kind, need.name, need.revision), []).append(need)
        pending = []
        for (kind, name, _), group in distinct.items():
            found = Found(keys=[n.key for n in group], kind=kind, name=name)
            report.found.append(found)
            keys = ", ".join(found.keys)
            problems = _resolve(group[0], found, offline)
            report.problems += [f"{keys}: {p}" for p in problems]
            if kind == "comet" and not problems:
                encoder = _comet_encoder(Need(keys, kind, name, group[0].revision))
                pending += [encoder] if encoder else []
    return report


def comet_dtype_problems(scorers: Sequence[tuple[str, object]]) -> list[str]:
    """A COMET scorer set to bfloat16 whose checkpoint COMET cannot run in it (COMET-22's
    average pooling): named by its key before hours of generation. `scorers` holds (config
    key, ScorerConfig). The scorer checks again when it loads, with `auto` resolved."""
    from cpo_data.config_score import bfloat16_problem, comet_hparams

    problems = []
    for key, scorer in scorers:
        if scorer.kind == "comet" and scorer.dtype == "bfloat16":
            problem = bfloat16_problem(comet_hparams(scorer.model, download=True))
            if problem:
                problems.append(f"{key}.dtype: bfloat16 cannot run {scorer.model}: {problem}")
    return problems


def build_needs(config) -> list[Need]:  # noqa: ANN001 - a BuildConfig
    """What a build reads: its source files, its generators' models and adapters, its COMET
    scorers."""
    needs = [Need(f"sources[{i}].path", "file", s.path) for i, s in enumerate(config.sources)]
    for i, model in enumerate(config.generate.models):
        needs.append(Need(f"generate.models[{i}].model", "model", model.model, model.revision))
        if model.adapter:
            needs.append(Need(f"generate.models[{i}].adapter", "adapter", model.adapter))
    for i, scorer in enumerate(config.score.scorers):
        if scorer.kind == "comet" and scorer.model:
            needs.append(Need(f"score.scorers[{i}].model", "comet", scorer.model))
    return needs


# An encoder's config and tokenizer, not its weights (10 GB for XLM-RoBERTa-XXL): COMET takes
# the weights from its own checkpoint.
ENCODER_FILES = ["*.json", *TOKENIZER]


def download(needs: Sequence[Need], progress: Callable[[str], None] = log.info) -> Report:
    """Fetch every hub repo the needs resolve to (at the commit found) into the Hugging Face
    cache, so that a machine without network runs under HF_HUB_OFFLINE=1; then check again
    from the cache alone. Repos with problems (gated without access, unknown) are skipped and
    stay in the report."""
    from huggingface_hub import snapshot_download

    first = check(needs, offline=False)
    for found in first.found:
        if found.where != "hub" or any(p.startswith(f"{', '.join(found.keys)}:")
                                       for p in first.problems):
            continue
        progress(f"downloading {found.name} @{found.commit}")
        snapshot_download(found.name, revision=found.commit, allow_patterns=(
            ENCODER_FILES if found.kind == "comet encoder" else None))
    again = check(needs, offline=True)
    # What the hub refused stays named as the hub named it.
    again.problems = first.problems + [p for p in again.problems
                                       if p.split(":")[0] not in _keys(first.problems)]
    return again


def _keys(problems: list[str]) -> set[str]:
    return {p.split(":")[0] for p in problems}
