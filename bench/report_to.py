"""What `train.report_to` costs per step: the same tiny training run with `report_to: []` and
with `[tensorboard]` (and `[wandb]`, offline, when it is installed), in one process.

Each way trains the same LoRA adapter on the same triplets for `--steps` steps (CPO sigmoid,
batch 4, no evaluation, one checkpoint at the end), `--repeats` times, the ways taking turns
(the first way changes every repeat). Reported per way:
- `ms_per_step`: the median over repeats of the time from the end of step 1 to the end of step
  N-1 (the loop's `on_step` callback) over N-2: everything a step costs, the metrics line and
  the dashboards included (step N is left out: the final checkpoint is written before its
  callback);
- `log_us_per_step`: time inside `Reporters.log` (every dashboard's writes of one step's
  metrics line), per step, measured directly: the step time's difference is within the noise
  of a 2-core machine, this is not;
- `open_s`, `close_s`: opening the writers (wandb: its service process) and closing them
  (TensorBoard: the event file's last writes).
The ratio is `ms_per_step` of a way over that of `report_to: []`.

    .venv/bin/python bench/report_to.py [--steps 200] [--repeats 3] [--hidden-size 32]
                                        [--layers 2] [--torch-threads N] [--no-wandb]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.update(WANDB_MODE="offline", WANDB_SILENT="true", WANDB_ERROR_REPORTING="false")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402

from cpo_data.testing import build_tiny_causal_lm, sample_triplets  # noqa: E402
from training import reporting  # noqa: E402
from training.config import LoraSettings, ScheduleSettings, TrainConfig  # noqa: E402
from training.loop import train  # noqa: E402


@contextmanager
def timed_reporters():
    """Seconds spent in `open_reporters`, `Reporters.log` (and its calls) and
    `Reporters.close` while the block runs; the originals are back afterwards."""
    spent = {"open": 0.0, "log": 0.0, "close": 0.0, "log_calls": 0}
    log, close, open_ = (reporting.Reporters.log, reporting.Reporters.close,
                         reporting.open_reporters)

    def timed(function, key):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - started
                spent["log_calls"] += key == "log"
        return call

    reporting.Reporters.log, reporting.Reporters.close = timed(log, "log"), timed(close, "close")
    reporting.open_reporters = timed(open_, "open")  # the loop calls it as reporting.<name>
    try:
        yield spent
    finally:
        reporting.Reporters.log, reporting.Reporters.close = log, close
        reporting.open_reporters = open_


def one_run(model: str, rows: list[dict], report_to: tuple[str, ...], steps: int,
            folder: Path) -> dict:
    config = TrainConfig(model=model, output_dir=str(folder), device="cpu", batch_size=4,
                         seed=0, report_to=report_to,
                         lora=LoraSettings(rank=8, alpha=16, dropout=0.0),
                         schedule=ScheduleSettings(max_steps=steps, lr_scheduler="constant",
                                                   warmup_ratio=0.0))
    ends: dict[int, float] = {}

    def on_step(step, metrics):
        ends[step] = time.perf_counter()

    with timed_reporters() as spent:
        train(config, rows, folder / "run", progress=False, on_step=on_step)
    return {"ms_per_step": 1000 * (ends[steps - 1] - ends[1]) / (steps - 2),
            "log_us_per_step": 1e6 * spent["log"] / max(spent["log_calls"], 1),
            "open_s": spent["open"], "close_s": spent["close"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--no-wandb", action="store_true")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)

    ways: list[tuple[str, ...]] = [(), ("tensorboard",)]
    if not args.no_wandb and importlib.util.find_spec("wandb") is not None:
        ways.append(("wandb",))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.environ.setdefault("WANDB_DIR", str(tmp))
        for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(variable, str(tmp / "wandb-home"))
        model = str(build_tiny_causal_lm(tmp / "model", hidden_size=args.hidden_size,
                                         layers=args.layers))
        rows = sample_triplets(rows_per_pair=20).to_pylist()
        one_run(model, rows, (), 5, tmp / "warm-up")  # imports, first-call costs
        runs: dict[str, list[dict]] = {"+".join(w) or "none": [] for w in ways}
        load = [os.getloadavg()[0]]
        for repeat in range(args.repeats):
            turn = ways[repeat % len(ways):] + ways[:repeat % len(ways)]
            for way in turn:
                name = "+".join(way) or "none"
                runs[name].append(one_run(model, rows, way, args.steps,
                                          tmp / f"{name}-{repeat}"))
            load.append(os.getloadavg()[0])
        if "wandb" in runs:
            import wandb

            wandb.teardown()

    baseline = statistics.median(r["ms_per_step"] for r in runs["none"])
    result = {
        "benchmark": "report_to",
        "steps": args.steps, "repeats": args.repeats,
        "model": f"tiny Llama {args.layers}x{args.hidden_size}, LoRA r8, batch 4, CPU",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "load_average_1min": load,
        "ways": {},
    }
    for name, found in runs.items():
        ms = statistics.median(r["ms_per_step"] for r in found)
        result["ways"][name] = {
            "ms_per_step": round(ms, 3),
            "ratio_to_none": round(ms / baseline, 4),
            "ms_per_step_runs": [round(r["ms_per_step"], 3) for r in found],
            "log_us_per_step": round(statistics.median(r["log_us_per_step"] for r in found), 1),
            "log_share_of_step": round(statistics.median(
                r["log_us_per_step"] / 1000 / r["ms_per_step"] for r in found), 5),
            "open_s": round(statistics.median(r["open_s"] for r in found), 4),
            "close_s": round(statistics.median(r["close_s"] for r in found), 4),
        }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
