"""Checkpoints of a training run: written whole or not at all, and read back exactly.

A checkpoint folder `checkpoint-{step}` holds what `save_pretrained` writes (the adapter for
LoRA, every weight for full fine-tuning), the tokenizer, the optimizer and scheduler state, the
random-number generators, and `trainer_state.json` with the step. It is written under a
temporary name and renamed into place, so a crash mid-write leaves no half checkpoint that a
resume would trust.

Nothing this module reads from a checkpoint can run code: every file goes through
`torch.load(weights_only=True)`, which rebuilds tensors and plain values (dicts, lists, numbers,
strings) and refuses any other object a pickle names. Optimizer and scheduler state dicts are
made of those already. The random-number states are turned into them before saving (`rng_state`
holds numpy arrays and tuples, so it is converted: the Python and numpy Mersenne-Twister words
as int64 tensors, the torch and CUDA states as the uint8 tensors torch gives). One torch file per
process keeps the layout (`rng_state.pt`, `rng_state_{rank}.pt`) and the one guard for every file;
a JSON + safetensors pair would be as safe but two files per rank.

A checkpoint written before this format (`rng_state.pt` as a full pickle) is not unpickled: the
run resumes without its random-number state and says so once, as the Hugging Face Trainer does
when a checkpoint lacks its RNG file. That state only decides dropout draws; the weights,
optimizer and scheduler (all loadable) are what a resume needs, so refusing would throw away a
long run for a reproducibility detail. An optimizer or scheduler file that the guard refuses was
not written by `save_checkpoint` at all, and training on without it would be wrong: that stops
with an error naming the file. So does one that is damaged (cut short by a full disk or an
interrupted copy: `save_checkpoint` itself never leaves one), while a damaged RNG file, like a
missing one, only costs the random-number state.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.errors import TrainingError

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")
# In the RNG file, so a file of another layout is told apart from a damaged one of this.
_RNG_FORMAT = 2
# What torch.load raises on a file that is cut short or garbled rather than refused: the zip
# reader's RuntimeError, EOFError, and KeyError/IndexError/ValueError from the unpickler
# reading bytes that are no pickle (all seen with torch 2.13 on truncated and garbage files).
# Also OSError EINVAL, from the zip reader seeking past the end of a cut file (most cut points
# of an RNG file); other OSErrors (missing, unreadable) are not damage and keep their own error.
_DAMAGED = (RuntimeError, EOFError, KeyError, IndexError, ValueError)


def checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in a run folder, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir()
             if (m := _NAME.match(p.name)) and (p / STATE_FILE).exists()]
    return [p for _, p in sorted(found)]


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / f"checkpoint-{step}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        # This process's GPU only: `_all` would create a CUDA context on every GPU from every
        # process of a data-parallel run.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_folder(final: Path, write: Callable[[Path], None]) -> Path:
    """`write` into a temporary folder, then rename it to `final`: whole or absent."""
    partial = final.parent / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    write(partial)
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def _write_pretrained(folder: Path, model, tokenizer) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_model(folder: Path, model, tokenizer) -> Path:
    """What `from_pretrained` reads (the adapter for LoRA, all weights otherwise), atomically."""
    return _write_folder(folder, lambda partial: _write_pretrained(partial, model, tokenizer))


def _rng_file(rank: int) -> str:
    # Rank 0's (or a lone process's) keeps the plain name, so any run can resume from it.
    return f"rng_state_{rank}.pt" if rank else "rng_state.pt"


def save_checkpoint(run_dir: str | Path, step: int, model, tokenizer, optimizer, scheduler,
                    state: dict[str, Any], keep: int,
                    rng_states: list[dict[str, Any]] | None = None) -> Path:
    """Write checkpoint-{step} atomically and delete all but the newest `keep`.

    `rng_states`: each process's random-number state, in rank order, when several train
    together (their dropout draws differ); default: this process's."""
    run_dir = Path(run_dir)
    rng_states = rng_states or [rng_state()]

    def write(partial: Path) -> None:
        _write_pretrained(partial, model, tokenizer)
        torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        for rank, random_state in enumerate(rng_states):
            save_rng_state(partial / _rng_file(rank), random_state)
        (partial / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))

    final = _write_folder(checkpoint_dir(run_dir, step), write)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def _to_saved_rng(state: dict[str, Any]) -> dict[str, Any]:
    """`rng_state()` as tensors and plain values only, what `weights_only=True` reads back."""
    version, words, gauss_next = state["python"]
    kind, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    saved = {"format": _RNG_FORMAT,
             "python": {"version": version, "words": torch.tensor(words, dtype=torch.int64),
                        "gauss_next": gauss_next},
             # int64: uint32 tensors lack most operations in torch; the words fit either way.
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached_gaussian)},
             "torch": state["torch"]}
    if "cuda" in state:
        saved["cuda"] = state["cuda"]
    return saved


def _from_saved_rng(saved: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `_to_saved_rng`; KeyError/TypeError/ValueError on another layout."""
    if saved.get("format") != _RNG_FORMAT:
        raise ValueError(f"format {saved.get('format')!r}, expected {_RNG_FORMAT}")
    python, numpy_state = saved["python"], saved["numpy"]
    state = {"python": (int(python["version"]), tuple(python["words"].tolist()),
                        python["gauss_next"]),
             "numpy": (str(numpy_state["kind"]), numpy_state["keys"].numpy().astype(np.uint32),
                       int(numpy_state["pos"]), int(numpy_state["has_gauss"]),
                       float(numpy_state["cached_gaussian"])),
             "torch": saved["torch"]}
    if not (isinstance(state["torch"], torch.Tensor) and state["torch"].dtype == torch.uint8):
        raise TypeError("the torch state is not a uint8 tensor")
    if "cuda" in saved:
        state["cuda"] = saved["cuda"]
    return state


def save_rng_state(path: Path, state: dict[str, Any]) -> None:
    torch.save(_to_saved_rng(state), path)


class _DamagedFile(Exception):
    """A checkpoint file torch cannot read because it is cut short or garbled."""


def _torch_load(path: Path) -> Any:
    """`path` read with `weights_only=True`; damage of any kind comes out as _DamagedFile."""
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except _DAMAGED as error:
        raise _DamagedFile(_first_line(error)) from None
    except OSError as error:
        if error.errno != errno.EINVAL:
            raise
        raise _DamagedFile(_first_line(error)) from None


def _load_safely(path: Path, what: str, checkpoint: Path) -> Any:
    """`path` read with `weights_only=True`; a file the guard refuses, or a damaged one, stops
    the resume."""
    try:
        return _torch_load(path)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0]
        raise TrainingError(
            f"{path}: refusing to load the {what}: the file holds objects other than tensors "
            f"and plain values, so save_checkpoint did not write it ({reason}). Delete "
            f"{checkpoint} to resume from an earlier checkpoint, or set "
            "train.checkpoints.resume: false to start over") from None
    except _DamagedFile as error:
        raise TrainingError(
            f"{path}: cannot read the {what}: the file is damaged or cut short "
            f"({error}). Delete {checkpoint} to resume from an earlier "
            "checkpoint, or set train.checkpoints.resume: false to start over") from None


def _first_line(error: BaseException) -> str:
    # torch's zip-reader messages run to several lines of advice about torch.load itself.
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _read_rng_file(path: Path) -> tuple[dict[str, Any] | None, str]:
    """The state in `path` and "", or None and why it cannot be had. Reading and converting
    are tried apart, so a file torch cannot read is told apart from a readable one of another
    layout (the two raise some of the same types)."""
    try:
        saved = _torch_load(path)
    except pickle.UnpicklingError:
        return None, ("it is a full pickle (written by an older cpo-data, or not by cpo-data) "
                      "and is not unpickled, as that could run code")
    except _DamagedFile as error:
        return None, f"it is damaged or cut short ({error})"
    try:
        return _from_saved_rng(saved), ""
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        return None, f"its layout is not this version's ({error})"


def load_rng_state(path: Path) -> dict[str, Any] | None:
    """The random-number state saved in `path`, or None (with one warning) when there is none
    this version can read without unpickling arbitrary objects, or the file is damaged: the
    weights, optimizer and schedule are what a resume needs (module docstring)."""
    state, why = _read_rng_file(path) if path.exists() else (None, "it is missing")
    if state is not None:
        return state
    log.warning("%s: resuming without the saved random-number state because %s; the run goes "
                "on from the checkpoint's weights, optimizer and schedule, but its dropout draws "
                "will differ from an uninterrupted run's", path, why)
    return None


def load_training_state(checkpoint: Path, optimizer, scheduler, rank: int = 0) -> None:
    """Optimizer, scheduler and random-number state as they were when `checkpoint` was saved
    (weights are loaded by the caller, which knows whether they are an adapter).

    Process `rank` of a data-parallel run takes its own random-number state (a checkpoint
    resumes only with the process count it was made with: `loop._resume_point`)."""
    # Everything is read before anything is set, so a refused file changes nothing.
    optimizer_state = _load_safely(checkpoint / "optimizer.pt", "optimizer state", checkpoint)
    scheduler_state = _load_safely(checkpoint / "scheduler.pt", "scheduler state", checkpoint)
    random_state = load_rng_state(checkpoint / _rng_file(rank))
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    if random_state is not None:
        set_rng_state(random_state)
