"""Shared fixtures. Tests run offline and on CPU: nothing may reach the Hugging Face hub."""

from __future__ import annotations

import json
import os
import tempfile

# Set before any Hugging Face library is imported by a test module.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Keep `datasets` caches out of the home folder (read when `datasets` is first imported).
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="cpo-data-tests-hf-")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def nest_train_settings(flat: dict) -> dict:
    """Training settings written flat (`max_steps=3, learning_rate=1e-2`, as the tests find
    them shortest), with the keys that live in a sub-section moved into it, under their names
    there (`TrainConfig.MOVED_KEYS`: `schedule.max_steps`, `checkpoints.every_steps`)."""
    from training.config import TrainConfig

    nested: dict = {}
    for key, value in flat.items():
        if key in TrainConfig.MOVED_KEYS:
            section, name = TrainConfig.MOVED_KEYS[key].split(".")
            nested.setdefault(section, {})[name] = value
        else:
            nested[key] = value
    return nested


def train_config(**flat):
    """`TrainConfig` from flat settings (see `nest_train_settings`)."""
    import typing

    from training.config import TrainConfig

    types = typing.get_type_hints(TrainConfig)
    sections = {moved.split(".")[0] for moved in TrainConfig.MOVED_KEYS.values()}
    settings = nest_train_settings(flat)
    for key in sections & settings.keys():
        settings[key] = types[key](**settings[key])
    return TrainConfig(**settings)


def processes_with_env(entry: str) -> list[str]:
    """Process ids whose environment holds `entry` (e.g. `PREFECT_HOME=/tmp/x`)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if entry.encode() in environ.read_bytes():
                found.append(environ.parent.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return found


@pytest.fixture
def rows() -> list[dict]:
    """Three labelled rows in two directions, in the demo corpus's layout."""
    return [
        {"src_lang": "de", "tgt_lang": "en", "src": "Der Zug fährt um acht Uhr ab.",
         "ref": "The train leaves at eight o'clock.", "sys_a": "The train departs at eight.",
         "sys_b": "The train drives at eight clock off.", "delta": 2.0},
        {"src_lang": "en", "tgt_lang": "de", "src": "Please close the window.",
         "ref": "Bitte schließen Sie das Fenster.", "sys_a": "Bitte das Fenster.",
         "sys_b": "Bitte schließe das Fenster.", "delta": -1.5},
        {"src_lang": "de", "tgt_lang": "en", "src": "Es regnet seit gestern.",
         "ref": "It has been raining since yesterday.", "sys_a": "It rains since yesterday.",
         "sys_b": "It has been raining since yesterday.", "delta": 0},
    ]


@pytest.fixture(scope="module")
def prefect_server():
    """A temporary Prefect database and server for the flow tests of one module only; it
    stops when the module's tests are done, so none outlives the test run."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield


@pytest.fixture
def events(monkeypatch):
    """Events a flow emits, recorded instead of sent."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
    yield lambda: (worker.drain(), worker._client.events)[1]
    worker.drain()
