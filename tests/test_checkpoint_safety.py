"""Resuming reads a checkpoint's files without running code from them, and restores exactly what
was saved: optimizer, scheduler and every random-number generator."""

from __future__ import annotations

import contextlib
import logging
import pathlib
import pickle
import random
import re
import shutil

import numpy as np
import pytest
import torch
from transformers.optimization import get_scheduler

from cpo_data.testing import build_tiny_causal_lm, sample_triplets
from tests.conftest import train_config
from training import checkpoint as ckpt
from training.config import LoraSettings
from training.errors import TrainingError
from training.loop import train


class Planted:
    """Unpickled freely, it creates `marker`: what a file planted in a run folder could do."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def plant(path: pathlib.Path, marker: pathlib.Path, writer: str = "torch") -> None:
    """Replace `path` by a pickle that runs code: as torch.save writes files, or as a plain
    pickle.dump (torch.load unpickles its first object before it finds no torch header)."""
    payload = {"state": Planted(marker), "param_groups": []}
    if writer == "torch":
        torch.save(payload, path)
    else:
        with path.open("wb") as out:
            pickle.dump(payload, out, protocol=2)  # torch's own protocol


class NoWeights:
    """Stands in for the model and tokenizer: these tests are about the other files."""

    def save_pretrained(self, folder) -> None:
        (pathlib.Path(folder) / "weights.txt").write_text("")


def trained_optimizer(steps: int = 3):
    """AdamW and the loop's default scheduler (inverse_sqrt) after `steps` steps."""
    params = [torch.nn.Parameter(torch.arange(4.0))]
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    scheduler = get_scheduler("inverse_sqrt", optimizer, num_warmup_steps=2,
                              num_training_steps=10)
    for _ in range(steps):
        (params[0] ** 2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return optimizer, scheduler


def fresh_optimizer():
    return trained_optimizer(steps=0)


def save(run_dir: pathlib.Path, optimizer, scheduler, rng_states=None) -> pathlib.Path:
    return ckpt.save_checkpoint(run_dir, 3, NoWeights(), NoWeights(), optimizer, scheduler,
                                {}, keep=1, rng_states=rng_states)


def draws() -> list:
    """What each generator gives next, including the cached second normal of random.gauss and
    numpy's legacy gauss, which the Mersenne-Twister words alone do not hold."""
    return [[random.random() for _ in range(3)], random.gauss(0, 1),
            np.random.rand(3).tolist(), float(np.random.standard_normal()),
            torch.rand(3).tolist()]


def seed_with_cached_normals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    random.gauss(0, 1)  # leaves gauss_next set
    np.random.standard_normal()  # leaves has_gauss = 1


@pytest.fixture(autouse=True)
def _keep_global_generators():
    """These tests reseed the process's generators; the tests after them get theirs back."""
    state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    yield
    random.setstate(state[0])
    np.random.set_state(state[1])
    torch.set_rng_state(state[2])


def rng_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == ckpt.__name__ and r.levelno == logging.WARNING]


# ---- nothing in a checkpoint runs when it is read ---------------------------------------------

def test_a_planted_pickle_runs_when_unpickled_freely(tmp_path):
    """The plant the tests below use is live: without weights_only it creates its marker."""
    marker = tmp_path / "ran"
    for writer in ("torch", "pickle"):
        plant(tmp_path / f"{writer}.pt", marker, writer)
        with contextlib.suppress(RuntimeError):  # the plain pickle: no torch header, after
            torch.load(tmp_path / f"{writer}.pt", weights_only=False)
        assert marker.exists()
        marker.unlink()


@pytest.mark.parametrize("writer", ["torch", "pickle"])
@pytest.mark.parametrize(("name", "what"), [("optimizer.pt", "optimizer state"),
                                            ("scheduler.pt", "scheduler state")])
def test_a_planted_optimizer_or_scheduler_file_stops_the_resume_unrun(tmp_path, name, what,
                                                                      writer):
    folder = save(tmp_path / "run", *trained_optimizer())
    marker = tmp_path / "ran"
    plant(folder / name, marker, writer)
    optimizer, scheduler = fresh_optimizer()
    with pytest.raises(TrainingError, match=rf"{re.escape(str(folder / name))}: refusing to "
                       rf"load the {what}: .*Delete .*checkpoint-3 to resume from an earlier "
                       r"checkpoint, or set train\.checkpoints\.resume: false"):
        ckpt.load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()
    assert optimizer.state_dict()["state"] == {}  # nothing was half restored
    assert scheduler.last_epoch == 0


@pytest.mark.parametrize("writer", ["torch", "pickle"])
def test_a_planted_rng_file_is_not_run_and_the_resume_goes_on_with_one_warning(
        tmp_path, caplog, writer):
    saved_optimizer, saved_scheduler = trained_optimizer()
    folder = save(tmp_path / "run", saved_optimizer, saved_scheduler)
    marker = tmp_path / "ran"
    plant(folder / "rng_state.pt", marker, writer)
    seed_with_cached_normals(7)
    untouched = draws()
    seed_with_cached_normals(7)
    optimizer, scheduler = fresh_optimizer()
    ckpt.load_training_state(folder, optimizer, scheduler)
    assert not marker.exists()
    (warning,) = rng_warnings(caplog)
    assert f"{folder / 'rng_state.pt'}: resuming without the saved random-number state" in warning
    assert "full pickle" in warning
    assert draws() == untouched  # the generators were left as they were
    assert scheduler.state_dict() == saved_scheduler.state_dict()  # the rest was restored
    assert torch.equal(optimizer.state_dict()["state"][0]["exp_avg"],
                       saved_optimizer.state_dict()["state"][0]["exp_avg"])


def test_a_checkpoint_of_the_older_format_resumes_without_its_rng_state(tmp_path, caplog):
    """Before this format, rng_state.pt was torch.save of rng_state() itself: numpy arrays and
    tuples that only a full unpickling reads. Such a run goes on, saying so once."""
    folder = save(tmp_path / "run", *trained_optimizer())
    torch.save(ckpt.rng_state(), folder / "rng_state.pt")  # what the older code wrote
    optimizer, scheduler = fresh_optimizer()
    ckpt.load_training_state(folder, optimizer, scheduler)
    assert len(rng_warnings(caplog)) == 1 and "full pickle" in rng_warnings(caplog)[0]
    assert scheduler.last_epoch == 3


# ---- a damaged file is named, not a traceback ------------------------------------------------

def cut_short(path: pathlib.Path, keep: float) -> None:
    """Keep the first `keep` of `path`'s bytes, as a full disk or an interrupted copy does."""
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


# Half a torch zip: RuntimeError from its reader; empty: EOFError from the unpickler.
@pytest.mark.parametrize("keep", [0.5, 0.0])
@pytest.mark.parametrize(("name", "what"), [("optimizer.pt", "optimizer state"),
                                            ("scheduler.pt", "scheduler state")])
def test_a_damaged_optimizer_or_scheduler_file_stops_the_resume_naming_it(tmp_path, name,
                                                                         what, keep):
    folder = save(tmp_path / "run", *trained_optimizer())
    cut_short(folder / name, keep)
    optimizer, scheduler = fresh_optimizer()
    with pytest.raises(TrainingError, match=rf"{re.escape(str(folder / name))}: cannot read "
                       rf"the {what}: the file is damaged or cut short .*Delete .*checkpoint-3 "
                       r"to resume from an earlier checkpoint, or set "
                       r"train\.checkpoints\.resume: false"):
        ckpt.load_training_state(folder, optimizer, scheduler)
    assert optimizer.state_dict()["state"] == {}  # nothing was half restored
    assert scheduler.last_epoch == 0


@pytest.mark.parametrize("keep", [0.5, 0.0])
def test_a_damaged_rng_file_is_warned_about_and_the_resume_goes_on(tmp_path, caplog, keep):
    saved_optimizer, saved_scheduler = trained_optimizer()
    folder = save(tmp_path / "run", saved_optimizer, saved_scheduler)
    cut_short(folder / "rng_state.pt", keep)
    seed_with_cached_normals(7)
    untouched = draws()
    seed_with_cached_normals(7)
    optimizer, scheduler = fresh_optimizer()
    ckpt.load_training_state(folder, optimizer, scheduler)
    (warning,) = rng_warnings(caplog)
    assert f"{folder / 'rng_state.pt'}: resuming without the saved random-number state" in warning
    assert "damaged or cut short" in warning
    assert draws() == untouched  # the generators were left as they were
    assert scheduler.state_dict() == saved_scheduler.state_dict()  # the rest was restored


def test_a_readable_rng_file_of_another_layout_is_not_called_damaged(tmp_path, caplog):
    """Reading and converting raise some of the same types; the warning tells which failed."""
    folder = save(tmp_path / "run", *trained_optimizer())
    torch.save({"format": 1}, folder / "rng_state.pt")
    ckpt.load_training_state(folder, *fresh_optimizer())
    (warning,) = rng_warnings(caplog)
    assert "its layout is not this version's" in warning


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A real run folder: two steps of a tiny Llama with a LoRA adapter, checkpoint-2 last."""
    model = str(build_tiny_causal_lm(tmp_path_factory.mktemp("model") / "llama"))
    config = train_config(model=model, batch_size=2, max_steps=2, learning_rate=1e-2,
                          lr_scheduler="constant", warmup_ratio=0.0, seed=0,
                          lora=LoraSettings(rank=4, alpha=8, dropout=0.1))
    rows = sample_triplets(rows_per_pair=2).to_pylist()
    run_dir = tmp_path_factory.mktemp("run") / "run"
    train(config, rows, run_dir, progress=False)
    return config, rows, run_dir


@pytest.mark.slow  # a few seconds: builds a tiny model and trains it
def test_a_resume_through_the_loop_never_runs_a_planted_file(finished_run, tmp_path, caplog):
    config, rows, original = finished_run
    marker = tmp_path / "ran"
    for name in ("optimizer.pt", "scheduler.pt"):
        run_dir = tmp_path / name
        shutil.copytree(original, run_dir)
        plant(run_dir / "checkpoint-2" / name, marker)
        with pytest.raises(TrainingError, match=rf"checkpoint-2/{name}: refusing to load"):
            train(config, rows, run_dir, progress=False)
        assert not marker.exists()
    run_dir = tmp_path / "rng"
    shutil.copytree(original, run_dir)
    plant(run_dir / "checkpoint-2" / "rng_state.pt", marker)
    result = train(config, rows, run_dir, progress=False)
    assert not marker.exists()
    assert result.resumed_from_step == 2
    assert len(rng_warnings(caplog)) == 1


# ---- what is saved comes back exactly -------------------------------------------------------

def test_save_then_load_restores_every_generator_and_the_optimizer_exactly(tmp_path, caplog):
    saved_optimizer, saved_scheduler = trained_optimizer()
    seed_with_cached_normals(1234)
    folder = save(tmp_path / "run", saved_optimizer, saved_scheduler)
    expected = draws()
    seed_with_cached_normals(99)  # other states everywhere
    optimizer, scheduler = fresh_optimizer()
    ckpt.load_training_state(folder, optimizer, scheduler)
    assert draws() == expected
    assert rng_warnings(caplog) == []

    got, want = optimizer.state_dict(), saved_optimizer.state_dict()
    assert got["param_groups"] == want["param_groups"]
    assert want["state"][0].keys() == got["state"][0].keys() == {"step", "exp_avg",
                                                                 "exp_avg_sq"}
    assert all(torch.equal(got["state"][0][k], want["state"][0][k]) for k in want["state"][0])
    assert scheduler.state_dict() == saved_scheduler.state_dict()
    scheduler.step()
    saved_scheduler.step()
    assert scheduler.get_last_lr() == saved_scheduler.get_last_lr()


def test_each_process_of_a_data_parallel_run_gets_its_own_rng_state_back(tmp_path):
    states = []
    for seed in (5, 6):
        seed_with_cached_normals(seed)
        states.append(ckpt.rng_state())
    after = []
    for state in states:
        ckpt.set_rng_state(state)
        after.append(draws())
    folder = save(tmp_path / "run", *trained_optimizer(), rng_states=states)
    assert sorted(p.name for p in folder.glob("rng_state*")) == ["rng_state.pt",
                                                                  "rng_state_1.pt"]
    for rank in (1, 0):
        seed_with_cached_normals(0)
        ckpt.load_training_state(folder, *fresh_optimizer(), rank=rank)
        assert draws() == after[rank]
