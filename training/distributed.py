"""Data-parallel training over several processes, as `torchrun` and `accelerate launch` start
them: each process holds the whole model and takes a share of every optimizer step's pairs.

The launcher sets `WORLD_SIZE`, `RANK` and `LOCAL_RANK`; with `WORLD_SIZE` above 1, `init` joins
the process group (NCCL on GPUs, gloo on CPU) and gives each process its own GPU. Alone (no
launcher, or one process), every function here is a no-op and the loop runs as it always has.

Why a plain all-reduce of the gradients and not `DistributedDataParallel`: every process's loss
is already its share of the whole step's loss (divided by the step's global pair and token
counts), so the step's gradient is the SUM of the processes' gradients. DDP would average them
(needing a world-size correction), would hang when a process has no pairs in a step (the last,
partial step of an epoch), and would stand between the loop and peft's model (`save_pretrained`,
`disable_adapter`). One bucketed all-reduce per optimizer step is what DDP does under
`no_sync()` with gradient accumulation; only its overlap of communication with the backward
pass is lost, which costs little for LoRA adapters.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from cpo_data.backends.torch_device import pick_device
from training.forward import Logps

BARRIER_TIMEOUT_MINUTES = 60

# Gradient elements per all-reduce: few calls, and at most 128 MB (float32) of extra memory.
_BUCKET = 32 * 2**20


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device_name: str) -> torch.device:
    """The device this process trains on; joins the process group first when launched.

    Under a launcher a CUDA device (`auto`, `cuda` or `cuda:N`) means `cuda:LOCAL_RANK`: one
    GPU per process."""
    device = pick_device(device_name)
    if not launched():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL and object collectives use the current device
    if not dist.is_initialized():
        # The others wait at a barrier while rank 0 writes a checkpoint: a 13B model's weights
        # and optimizer state on network storage can take longer than the 10 min default.
        timeout = timedelta(minutes=BARRIER_TIMEOUT_MINUTES)
        if device.type == "cuda":  # bound to its GPU, so barriers know which one to use
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return device


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0: the one process that writes files and shows progress."""
    return rank() == 0


def barrier() -> None:
    if active():
        dist.barrier()


def share(count: int, rank: int, world: int) -> tuple[int, int]:
    """Start and stop of rank `rank`'s part of `count` items split into `world` contiguous
    parts whose sizes differ by at most one (the first ranks take one more)."""
    base, extra = divmod(count, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def my_share(step: list[list[int]], batch_size: int) -> tuple[int, list[list[int]]]:
    """This process's micro-batches of one optimizer step (all of them when alone), and where
    its first pair stands among the step's pairs.

    The step's pairs, in the plan's order, are cut into one contiguous part per process, so
    together the processes see exactly the pairs one process would."""
    world = world_size()
    if world == 1:
        return 0, step
    pairs = [index for micro in step for index in micro]
    start, stop = share(len(pairs), rank(), world)
    return start, [pairs[i: min(i + batch_size, stop)] for i in range(start, stop, batch_size)]


def reduce_numbers(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """`values` added up (or the largest, `op="max"`) over all processes; float64, so counts
    stay exact."""
    if not active():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor.tolist()


def sum_gradients(parameters: list[torch.Tensor]) -> None:
    """Replace each gradient by its sum over all processes (see the module docstring)."""
    if not active():
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for parameter in parameters:
        if parameter.grad is None:  # a process with no pairs in this step
            parameter.grad = torch.zeros_like(parameter)
        grad = parameter.grad
        if bucket and (grad.dtype != bucket[0].dtype or size + grad.numel() > _BUCKET):
            _all_reduce_flat(bucket)
            bucket, size = [], 0
        bucket.append(grad)
        size += grad.numel()
    if bucket:
        _all_reduce_flat(bucket)


def _all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    if len(tensors) == 1:
        dist.all_reduce(tensors[0])
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(part.view_as(tensor))


def broadcast_parameters(parameters: list[torch.Tensor]) -> None:
    """Rank 0's values in every process: all start from the same weights, as DDP ensures."""
    if not active():
        return
    with torch.no_grad():
        for parameter in parameters:
            dist.broadcast(parameter, src=0)


def gather_logps(parts: list[Logps], start: int, total: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> Logps:
    """Every process's per-pair log-probabilities in pair order, from each process's `parts`
    holding pairs `start`... of `total`; so metrics are computed over the whole batch.
    `dtype` is the log-probabilities' own (float32, or float64 for an fp64 run).

    Each process writes its rows into a zero table at its own place and the tables are added:
    one all-reduce, exact (x + 0 = x; float32/float64 sums and integer counts fit float64)."""
    if not active():
        return Logps.cat(parts)
    columns = Logps.columns()
    table = torch.zeros((total, len(columns)), dtype=torch.float64, device=device)
    if parts:
        mine = Logps.cat(parts)
        rows = torch.stack([getattr(mine, name).double() for name in columns], dim=1)
        table[start: start + rows.shape[0]] = rows
    dist.all_reduce(table)
    return Logps(*(table[:, i].to(torch.long if name.endswith("_count") else dtype)
                   for i, name in enumerate(columns)))


def gather_objects(value):
    """`value` from every process, in rank order (`[value]` alone)."""
    if not active():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values
