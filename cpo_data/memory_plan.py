"""The memory plan: what each stage holds on each device, from the preflight's file sizes.

A stage's models share a device until the next stage releases them (`backends/loaded.py`), so
the peak on a device is its largest stage, not the sum. The plan counts weights at the dtype
the run uses: a checkpoint's bytes divided by its stored dtype's width (config.json
`torch_dtype`; COMET checkpoints are float32) times the run dtype's. Training counts what its
optimizer holds too. Activations, beams and the KV cache come on top: a stage near a device's
size is a warning, one over it a problem.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass

from cpo_data.preflight import Found, Report

WIDTH = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
NEAR = 0.9  # of a device's memory: weights alone above this leave too little for activations


@dataclass(frozen=True)
class Load:
    """One model a stage holds on a device."""

    stage: str
    key: str
    device: str
    bytes: int
    dtype: str


def weight_bytes(files: dict[str, int]) -> int:
    """Bytes of the weights a loader reads: safetensors where there are any (a repo may also
    carry the same weights as .bin), else .bin; COMET's .ckpt."""
    def total(suffix: str) -> int:
        return sum(size for name, size in files.items() if name.endswith(suffix))

    return (total(".safetensors") or total(".bin")) + total(".ckpt")


def stored_dtype(found: Found) -> str:
    """The dtype the weights are stored in: config.json's `torch_dtype` (or `dtype`), where
    the files are on this machine; float32 otherwise (COMET, and transformers' default)."""
    if found.local is not None and (found.local / "config.json").is_file():
        config = json.loads((found.local / "config.json").read_text())
        value = str(config.get("torch_dtype") or config.get("dtype") or "float32")
        return value if value in WIDTH else "float32"
    return "float32"


def _at(found: Found | None, per_parameter: int) -> int:
    """Bytes the weights take at `per_parameter` bytes each; 0 where the files are unknown."""
    if found is None or not found.files:
        return 0
    return weight_bytes(found.files) // WIDTH[stored_dtype(found)] * per_parameter


def _device(name: str, cuda_visible: bool) -> str:
    if name == "auto":
        return "cuda:0" if cuda_visible else "cpu"
    return "cuda:0" if name == "cuda" else name


def _auto_dtype(dtype: str, device: str, bf16: bool) -> str:
    if dtype != "auto":
        return dtype
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if bf16 else "float16"


def stage_loads(build, train, report: Report, cuda_visible: bool,  # noqa: ANN001 - configs
                bf16: bool = True) -> list[Load]:
    """Each stage's models, at the dtype and on the device the run will use."""
    loads = []
    for i, model in enumerate(build.generate.models if build else ()):
        device = _device(model.device, cuda_visible)
        dtype = _auto_dtype(model.dtype, device, bf16)
        key = f"generate.models[{i}].model"
        loads.append(Load("generate", key, device, _at(report.by_key(key), WIDTH[dtype]), dtype))
    for i, scorer in enumerate(build.score.scorers if build else ()):
        if scorer.kind == "comet" and scorer.model:
            device = _device(scorer.device, cuda_visible)
            dtype = _auto_dtype(scorer.dtype, device, bf16)
            key = f"score.scorers[{i}].model"
            loads.append(Load("score", key, device, _at(report.by_key(key), WIDTH[dtype]),
                              dtype))
    if train is not None:
        device = _device(train.device, cuda_visible)
        full = "float64" if train.precision == "fp64" else "float32"
        if train.finetune == "full":  # the weights, their gradients and AdamW's two moments
            dtype, per_parameter = f"{full} weights, gradients, AdamW", 4 * WIDTH[full]
        else:  # a LoRA run holds its frozen base in bf16 on a GPU that has it
            half = device.startswith("cuda") and (
                train.precision == "bf16" or (train.precision == "auto" and bf16))
            dtype = "bfloat16" if half else full
            per_parameter = WIDTH[dtype]
        loads.append(Load("train", "train.model", device,
                          _at(report.by_key("train.model"), per_parameter), dtype))
    return loads


def human_bytes(size: int | None) -> str:
    """1.2 GB, 340.0 MB, 12.5 kB: sizes as a person reads them."""
    if size is None:
        return ""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _gb(size: int) -> str:
    return human_bytes(size) if size else "size unknown"


def visible_memory(device: str) -> int | None:
    """Bytes of memory `device` has, as this process sees it; None when it cannot see it
    (a CPU-only flow host of GPU workers, a device index beyond the visible ones)."""
    if device == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        import torch
    except ImportError:
        return None
    index = int(device.split(":")[1]) if ":" in device else 0
    if not torch.cuda.is_available() or index >= torch.cuda.device_count():
        return None
    return torch.cuda.get_device_properties(index).total_memory


def plan(build, train, report: Report,  # noqa: ANN001 - BuildConfig, TrainConfig or None
         capacity: Callable[[str], int | None] = visible_memory) -> None:
    """Fill `report.memory` with each stage's weights per device, and add a problem for a
    stage whose weights do not fit the device's memory."""
    needs_cuda = any(d.startswith("cuda") or d == "auto" for d in _devices(build, train))
    cuda_visible, bf16 = False, True
    if needs_cuda:
        try:
            import torch

            cuda_visible = torch.cuda.is_available()
            bf16 = not cuda_visible or torch.cuda.is_bf16_supported()
        except ImportError:
            pass
    by_stage: dict[tuple[str, str], list[Load]] = {}
    for load in stage_loads(build, train, report, cuda_visible, bf16):
        by_stage.setdefault((load.stage, load.device), []).append(load)
    on_workers = build is not None and build.runner.kind == "dask"
    for (stage, device), loads in by_stage.items():
        total = sum(load.bytes for load in loads)
        what = ", ".join(f"{load.key} {_gb(load.bytes)} {load.dtype}" for load in loads)
        if on_workers and stage != "train":
            report.memory.append(f"{stage} on each Dask worker's {device}: {_gb(total)} of "
                                 f"weights ({what})")
            continue
        available = capacity(device)
        if available is None:
            report.memory.append(f"{stage} on {device}: {_gb(total)} of weights ({what}); "
                                 "this machine does not see that device")
            continue
        report.memory.append(f"{stage} on {device}: {_gb(total)} of weights ({what}) of "
                             f"{_gb(available)}")
        if total > available:
            report.problems.append(
                f"memory: {stage} on {device} holds {_gb(total)} of weights ({what}), more "
                f"than its {_gb(available)}: a smaller dtype, another device, or fewer models "
                "per stage")
        elif total > NEAR * available:
            report.memory[-1] += " (tight: activations come on top)"


def _devices(build, train) -> list[str]:  # noqa: ANN001
    devices = [m.device for m in build.generate.models] if build else []
    devices += [s.device for s in build.score.scorers if s.kind == "comet"] if build else []
    return devices + ([train.device] if train is not None else [])
