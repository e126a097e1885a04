"""What the config dataclasses share: their error, value checks, dtype choices, path markers.

A field holding a path says so in its metadata (`metadata=FILE` or `metadata=MODEL`), and
`cpo_data.project.resolve_paths` resolves every marked field, however deeply nested, against
the YAML file's folder: one mechanism, so a new path field is resolved by marking it.
"""

from __future__ import annotations

from typing import Any

from cpo_data.errors import UserError
from cpo_data.langs import UnknownLanguageError, get_language

FILE = {"path": "file"}
"""A local path or fsspec URI: a relative path resolves against the YAML's folder."""
MODEL = {"path": "model"}
"""A hub id or a local folder: only an explicit relative path (./m, ../m) resolves; `org/name`
is a hub id."""

DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
"""Dtypes a generator or a scorer may run in. Here, not beside either config, because both
check against it and they live in two modules (`cpo_data.config`, `cpo_data.config_score`)."""


class ConfigError(UserError):
    """A config value that cannot work; the message starts with the key's path."""


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"{key}: {message}")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, f"{value!r} is not one of {', '.join(choices)}")


def _check_at_least(config: Any, minimum: int, *keys: str) -> None:
    """Each named integer field is at least `minimum` (0: a count, 1: a size)."""
    for key in keys:
        if getattr(config, key) < minimum:
            _fail(key, "must be 0 or more" if minimum == 0 else f"must be at least {minimum}")


def _check_device(key: str, device: str) -> None:
    if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
        _fail(key, f"{device!r} is not auto, cpu, cuda or cuda:N")


def _check_lang(key: str, code: str | None) -> None:
    if code is None:
        return
    try:
        get_language(code)
    except UnknownLanguageError as error:
        _fail(key, str(error))


def _check_prompt(key: str, template: str) -> None:
    """A prompt template the stages can fill: it holds {src}, and {Src}, {Tgt}, {src_lang},
    {tgt_lang} are all it may ask for besides."""
    if "{src}" not in template:
        _fail(key, "must contain {src}")
    try:
        template.format(Src="x", Tgt="y", src="z", src_lang="a", tgt_lang="b")
    except (KeyError, IndexError, ValueError) as error:
        _fail(key, f"cannot be filled: {error!r}")
