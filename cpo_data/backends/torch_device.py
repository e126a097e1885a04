"""Device and dtype choice, and splitting a batch on CUDA out-of-memory: shared by backends."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from cpo_data.errors import UserError

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class DeviceError(UserError):
    """A device that this machine does not have."""


def pick_device(name: str) -> torch.device:
    """auto: CUDA when torch sees it, else CPU; or the named device, if present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r} asked for, but torch sees no CUDA device")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on GPUs that support it, fp16 on other GPUs, fp32 on CPU; or the named dtype."""
    if name != "auto":
        return getattr(torch, name)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def halving_on_oom(run: Callable[[Sequence[Item]], list[Result]], items: Sequence[Item],
                   label: str) -> tuple[list[Result], int]:
    """`run(items)`, and on CUDA out-of-memory the same on each half, down to single items.

    Returns the results (in order) and how many times a batch was split.
    """
    try:
        return run(items), 0
    except torch.cuda.OutOfMemoryError:
        if len(items) == 1:
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        half = len(items) // 2
        log.warning("%s: out of GPU memory on %d rows; retrying as %d + %d", label,
                    len(items), half, len(items) - half)
        first, first_splits = halving_on_oom(run, items[:half], label)
        second, second_splits = halving_on_oom(run, items[half:], label)
        return first + second, 1 + first_splits + second_splits
