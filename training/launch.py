"""The training flow on several GPUs: `torchrun` starts `python -m training` once per GPU.

With `train.processes` above 1, the flow (and so `cpo-data train` and the deployment that a
published version triggers) does not train in its own process: one process per GPU must each
hold the model, and only a launcher can start them as one process group. The run is the same
as `torchrun --standalone --nproc_per_node N -m training CONFIG --version V` typed by hand:
rank 0 writes the run folder and its `run_manifest.json`, which this module reads back.

The config goes to the launched processes as YAML in the run folder (`launch_config.yaml`),
so a config given as a `TrainConfig` object, not a file, trains the same way; its paths are
already absolute.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from cpo_data.leftovers import dying_with_parent
from cpo_data.project import resolve_paths
from training.config import TrainConfig
from training.errors import TrainingError
from training.run import RUN_MANIFEST

LAUNCH_CONFIG = "launch_config.yaml"


def launch_command(config_path: Path, version: str, processes: int) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, the one in this environment) on one
    machine: `--standalone` picks a free rendezvous port itself."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(processes), "-m", "training", str(config_path),
            "--version", version]


def write_launch_config(config: TrainConfig, run_dir: Path) -> Path:
    """The config as a YAML file in the run folder. Relative paths (a `TrainConfig` built in
    code) are made absolute first: the launched processes would read them against the file's
    folder, not this process's working directory."""
    path = run_dir / LAUNCH_CONFIG
    run_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_paths(config, Path.cwd())
    # Through JSON: tuples become lists, which the YAML loader reads back into tuples.
    train = json.loads(json.dumps(dataclasses.asdict(config)))
    path.write_text(yaml.safe_dump({"train": train}, sort_keys=False), encoding="utf-8")
    return path


def check_gpus(config: TrainConfig) -> None:
    """One GPU per process: more processes than visible GPUs is refused before any starts.
    Without CUDA (or with `device: cpu`) the processes train on CPU (gloo), as tests do."""
    import torch

    if config.device == "cpu" or not torch.cuda.is_available():
        return
    gpus = torch.cuda.device_count()
    if config.processes > gpus:
        raise TrainingError(f"train.processes: {config.processes} processes need as many GPUs; "
                            f"{gpus} visible (CUDA_VISIBLE_DEVICES)")


def train_launched(config: TrainConfig, version: str,
                   log: Callable[[str], None] = print) -> dict:
    """Train `version` on `config.processes` processes; the run manifest rank 0 wrote.

    The launched processes' output goes to `log` line by line (`python -m training` shows no
    progress bar when its output is not a terminal). A failed launch raises `TrainingError`
    naming the processes' errors, or with the end of their output."""
    check_gpus(config)
    run_dir = Path(config.output_dir).resolve() / version
    command = launch_command(write_launch_config(config, run_dir), version, config.processes)
    log(" ".join(command))
    tail: deque[str] = deque(maxlen=30)
    causes: dict[str, None] = {}  # the entry's own `error (rank N): ...` lines, in order
    # Killed outright (SIGKILL), this process runs no cleanup: the kernel sends torchrun
    # SIGTERM instead, which it passes on to its workers. This thread waits for torchrun, so
    # the signal (tied to the thread that started the child) cannot fire early.
    with subprocess.Popen(dying_with_parent(command, signal.SIGTERM), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process:
        try:
            for line in process.stdout:
                line = line.rstrip()
                tail.append(line)
                if line.startswith("error"):
                    causes[line] = None
                log(line)
        except BaseException:
            # Cancelled or failed here (a Prefect cancellation, Ctrl-C): torchrun passes
            # SIGTERM on to its workers; their GPUs must not outlive the flow.
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    if process.returncode != 0:
        # torchrun's own report of which rank failed buries the cause; name it when known.
        raise TrainingError(f"training on {config.processes} processes failed (torchrun exit "
                            f"{process.returncode}); " + (
                                "\n".join(causes) if causes else
                                "its last lines:\n" + "\n".join(tail)))
    return json.loads((run_dir / RUN_MANIFEST).read_text())
