"""`python -m training CONFIG [--version V]`: one training run without Prefect (read and verify
the version, train, evaluate, write the run manifest), on one process or on several started by
a launcher, which then train data-parallel (`training/distributed.py`):

    python -m training configs/demo.yaml
    torchrun --standalone --nproc_per_node 4 -m training configs/alma-r.yaml
    accelerate launch --multi_gpu --num_processes 4 -m training configs/alma-r.yaml

Rank 0 writes the run folder and prints the summary; the others only train.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from cpo_data.errors import UserError
from training import distributed


def main(argv: list[str] | None = None) -> int:
    from training.config import load_train_config
    from training.run import RUN_MANIFEST, run_training

    parser = argparse.ArgumentParser(
        prog="python -m training", description="Train on a published triplet version (the "
        "YAML's train section), alone or under torchrun / accelerate launch.")
    parser.add_argument("config", help="config (YAML) with a train section")
    parser.add_argument("--version", help="dataset version (default: the config's, latest)")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # Rank 0 speaks for all (resuming, truncated examples, ...): the others would repeat it.
    logging.basicConfig(level=logging.ERROR if rank else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("cpo_data").setLevel(logging.ERROR if rank else logging.INFO)
    try:
        config = load_train_config(args.config)
        if config.processes > 1 and not distributed.launched():
            logging.getLogger("cpo_data.training").warning(
                "train.processes is %d, but no launcher started this process: training on "
                "one. Use torchrun --nproc_per_node %d -m training ..., or cpo-data train.",
                config.processes, config.processes)
        # A bar redraws one line; piped into a log (the training flow's launch) it would keep
        # every redraw in one line, so it shows on terminals only.
        record = run_training(config, args.version, progress=sys.stderr.isatty())
    except UserError as error:
        print(f"error{f' (rank {rank})' if distributed.launched() else ''}: {error}",
              file=sys.stderr)
        return 2
    finally:
        distributed.close()
    if record is not None:
        loss = record["metrics"].get("loss")  # none when a finished run was rerun
        print(f"trained {record['steps']} steps on {record['dataset_uri']} version "
              f"{record['dataset_version']}" + (f": loss {loss:.4f}" if loss is not None else ""))
        for name, value in record["eval"].items():
            print(f"{name:<26}{value:.4f}")
        print(f"model     {record['model_dir']}")
        print(f"manifest  {Path(record['model_dir']).parent / RUN_MANIFEST}")
    return 0


if __name__ == "__main__":
    code = main()
    # As `cpo-data` does (pipelines/cli.py, console): pyarrow 21 can abort a finished process
    # during interpreter teardown, and a launcher would take that for a failed rank.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
