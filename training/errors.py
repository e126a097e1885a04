"""The training run's errors, raised by the loop and the stages around it."""

from __future__ import annotations

from pathlib import Path

from cpo_data.errors import UserError


class TrainingError(UserError):
    """Input the loop cannot train on; the message says which and why."""


class TrainingDiverged(UserError, RuntimeError):
    """The loss or gradient stopped being finite; the last good weights are kept."""

    def __init__(self, message: str, step: int, checkpoint: Path):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
