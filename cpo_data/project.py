"""The project file: one YAML file, read once, holding a whole project.

Its top-level keys are the build's (sources, generate, score, select, publish, work_dir,
shard_size, runner), `train` (read by `training.config`), `deploy` (read by `pipelines.deploy`)
and `prompt_template`, the one prompt every stage uses unless a section sets its own. Each
layer turns its sections into its frozen configs from the one `ProjectFile`, so no entry point
reads the file twice; `pipelines.project.load_project` gathers them all.

The YAML maps onto the dataclasses one to one: every key is a field, an unknown key or a wrong
type is refused before any work starts, with the key's full path in the message
(`sources[0].src_colum: unknown key`). Path fields are marked in the dataclasses' metadata
(`cpo_data.fields.FILE`, `MODEL`) and resolved here, in one place, against the file's folder.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cpo_data.config import BuildConfig, PublishConfig
from cpo_data.fields import ConfigError, _check_prompt, _fail

OTHER_SECTIONS = ("train", "deploy", "prompt_template")
"""Top-level keys that are not the build's."""


@dataclass(frozen=True)
class ProjectFile:
    """A project file's parsed content, read once."""

    path: Path
    """The file, absolute."""
    data: dict[str, Any]
    """Its top-level mapping."""

    @property
    def base(self) -> Path:
        """The folder relative paths resolve against."""
        return self.path.parent

    def section(self, name: str) -> dict[str, Any] | None:
        """A top-level section's mapping, or None when the file has none."""
        value = self.data.get(name)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{self.path}: {name}: expected a mapping, got "
                              f"{type(value).__name__}")
        return value

    @property
    def prompt_template(self) -> str | None:
        """The project-wide prompt (`prompt_template:` at the top), if the file sets one;
        checked here, under its own key, as the sections check theirs."""
        value = self.data.get("prompt_template")
        if value is None:
            return None
        if not isinstance(value, str):
            raise ConfigError(f"{self.path}: prompt_template: expected str, got "
                              f"{type(value).__name__}")
        try:
            _check_prompt("prompt_template", value)
        except ConfigError as error:
            raise ConfigError(f"{self.path}: {error}") from None
        return value


def read_yaml(path: Path) -> Any:
    """The parsed YAML file; a missing file or bad YAML is a `ConfigError` naming it."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def read_project(path: str | Path) -> ProjectFile:
    """Read a project file: the only place a project's YAML is read."""
    path = Path(path).resolve()
    data = read_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return ProjectFile(path, data)


def with_prompt(section: dict[str, Any], prompt: str | None, *keys: str) -> dict[str, Any]:
    """`section` with the project prompt filled in under `keys` (a nested path) where the
    section does not set its own."""
    if prompt is None:
        return section
    *parents, last = keys
    section = dict(section)
    inner = section
    for key in parents:
        if not isinstance(inner.get(key) or {}, dict):
            return section  # not a mapping: from_dict names the key
        inner[key] = dict(inner.get(key) or {})
        inner = inner[key]
    inner.setdefault(last, prompt)
    return section


def build_section(project: ProjectFile) -> BuildConfig:
    """The build's frozen config, with its paths resolved."""
    data = {key: value for key, value in project.data.items() if key not in OTHER_SECTIONS}
    prompt = project.prompt_template
    data = with_prompt(data, prompt, "select", "prompt_template")
    if prompt is not None and isinstance(data.get("generate"), dict):
        models = data["generate"].get("models")
        if isinstance(models, list):
            data["generate"] = {**data["generate"], "models": [
                with_prompt(m, prompt, "prompt_template") if isinstance(m, dict) else m
                for m in models]}
    return parse(BuildConfig, data, project, "")


def published_dataset(project: ProjectFile) -> str | None:
    """The URI of the dataset this project's build publishes ({store}/{name}), from its
    checked `publish` section; None when the file has none."""
    from cpo_data.store import dataset_uri

    section = project.section("publish")
    if section is None:
        return None
    publish = parse(PublishConfig, section, project, "publish")
    return dataset_uri(publish.uri, publish.name)


def parse(cls: type, data: Any, project: ProjectFile, key: str) -> Any:
    """`cls` from one section of the file, paths resolved; errors name the file and key."""
    try:
        return resolve_paths(from_dict(cls, data, key), project.base)
    except ConfigError as error:
        raise ConfigError(f"{project.path}: {error}") from None


# ---- YAML onto dataclasses ----------------------------------------------------------------


def _is_optional(type_: Any) -> bool:
    return typing.get_origin(type_) in (typing.Union, types.UnionType) and type(None) in (
        typing.get_args(type_)
    )


def _convert(value: Any, type_: Any, key: str) -> Any:
    """Check one YAML value against a field's annotation and convert it."""
    if _is_optional(type_):
        if value is None:
            return None
        (type_,) = [t for t in typing.get_args(type_) if t is not type(None)]
    origin = typing.get_origin(type_)
    if dataclasses.is_dataclass(type_):
        return from_dict(type_, value, key)
    if origin is tuple:
        (item_type, _) = typing.get_args(type_)
        if not isinstance(value, list):
            _fail(key, f"expected a list, got {type(value).__name__}")
        return tuple(_convert(v, item_type, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        key_type, value_type = typing.get_args(type_)
        if not isinstance(value, dict):
            _fail(key, f"expected a mapping, got {type(value).__name__}")
        return {
            _convert(k, key_type, key): _convert(v, value_type, f"{key}.{k}")
            for k, v in value.items()
        }
    if type_ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type_ in (str, int, float, bool):
        if not isinstance(value, type_) or (type_ is int and isinstance(value, bool)):
            _fail(key, f"expected {type_.__name__}, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"{key}: no YAML conversion for {type_}")  # a programming error


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Build dataclass `cls` from a YAML mapping, naming the key of anything wrong."""
    prefix = f"{key}." if key else ""
    if not isinstance(data, dict):
        _fail(key or "config", f"expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    moved = getattr(cls, "MOVED_KEYS", {})  # a layout's renamed keys, named in the error
    for name in data:
        if name in moved and name not in fields:
            _fail(f"{prefix}{name}", f"moved: write it as {prefix}{moved[name]}")
        if name not in fields:
            _fail(f"{prefix}{name}", f"unknown key (known: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], f"{prefix}{name}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            _fail(f"{prefix}{name}", "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        # __post_init__ names the field; give it its full path.
        raise ConfigError(f"{prefix}{error}") from None


# ---- paths --------------------------------------------------------------------------------


def resolve_path(path: str, base: Path) -> str:
    """A local path made absolute against `base` (`~` is the home folder); URIs and absolute
    paths stay as they are."""
    if "://" in path:
        return path
    local = Path(path).expanduser()
    return str(local if local.is_absolute() else (base / local).resolve())


def resolve_paths(config: Any, base: Path) -> Any:
    """`config` (a dataclass instance) with every field marked FILE or MODEL resolved against
    `base`, in nested configs and tuples of them too."""
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind = f.metadata.get("path")
        if isinstance(value, str) and kind == "file":
            changes[f.name] = resolve_path(value, base)
        elif isinstance(value, str) and kind == "model" and value.startswith((".", "~")):
            changes[f.name] = resolve_path(value, base)  # `org/name` is a hub id
        elif dataclasses.is_dataclass(value):
            changes[f.name] = resolve_paths(value, base)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            changes[f.name] = tuple(resolve_paths(v, base) for v in value)
    return dataclasses.replace(config, **changes) if changes else config
