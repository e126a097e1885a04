"""Checkpoints of a training run: written whole or not at all, and read back exactly.

A checkpoint folder `checkpoint-{step}` holds what `save_pretrained` writes (the adapter for
LoRA, every weight for full fine-tuning), the tokenizer, the optimizer and scheduler state, the
random-number generators, and `trainer_state.json` with the step. It is written under a
temporary name and renamed into place, so a crash mid-write leaves no half checkpoint that a
resume would trust.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


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
            torch.save(random_state, partial / _rng_file(rank))
        (partial / STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))

    final = _write_folder(checkpoint_dir(run_dir, step), write)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())


def load_training_state(checkpoint: Path, optimizer, scheduler, rank: int = 0) -> None:
    """Optimizer, scheduler and random-number state as they were when `checkpoint` was saved
    (weights are loaded by the caller, which knows whether they are an adapter).

    Process `rank` of a data-parallel run takes its own random-number state (a checkpoint
    resumes only with the process count it was made with: `loop._resume_point`)."""
    rng_file = checkpoint / _rng_file(rank)
    # weights_only=False: the RNG state holds numpy arrays and Python tuples; the file is our
    # own, written by save_checkpoint.
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(checkpoint / "scheduler.pt", weights_only=False))
    set_rng_state(torch.load(rng_file, weights_only=False))
