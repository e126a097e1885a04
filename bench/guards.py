"""What the candidate guards cost a build: the same cold build with the guards on and off.

Tiny local models as in bench/build.py (a Llama-style LM translating greedily, a CometKiwi-style
checkpoint and chrF scoring; the demo rows cycled to N distinct sources, so each has the
reference, two provided outputs and one generated candidate). Per size, `run_build` runs cold
with every guard off and with the defaults on, each in its own work_dir, after a warm-up build
that loads the models; the guards' own seconds are timed inside
`cpo_data.guards.check_candidates`. Prints one JSON object.

    .venv/bin/python bench/guards.py [--sizes 180 8000] [--max-new-tokens 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import yaml  # noqa: E402

from cpo_data import build, guards  # noqa: E402
from cpo_data.config import load_config  # noqa: E402
from cpo_data.config_guards import GuardsConfig  # noqa: E402
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_build", Path(__file__).with_name("build.py"))
bench_build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_build)

# Every guard GuardsConfig has, so that a guard added later is off here too.
OFF = {guard.name: {"enabled": False} for guard in dataclasses.fields(GuardsConfig)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[180, 8000])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    spent = {"seconds": 0.0, "vetoes": 0}
    real = guards.check_candidates

    @functools.wraps(real)
    def timed_guards(*a, **k):
        start = time.perf_counter()
        vetoes = real(*a, **k)
        spent["seconds"] += time.perf_counter() - start
        spent["vetoes"] += len(vetoes.by_candidate)
        return vetoes

    guards.check_candidates = timed_guards
    results = {}
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        models = {"causal": str(build_tiny_causal_lm(root / "llama")),
                  "kiwi": str(build_tiny_comet(root / "kiwi"))}
        # Models load on the first build of a process: a warm-up build pays that once.
        build.run_build(load_config(bench_build.write_config(
            root / "warm-up", models, bench_build.source_rows(20), args)))
        for size in args.sizes:
            rows = bench_build.source_rows(size)
            row = {}
            for name, section in (("off", OFF), ("on", None)):
                path = bench_build.write_config(root / f"{size}-{name}", models, rows, args)
                if section is not None:
                    data = yaml.safe_load(path.read_text())
                    data["guards"] = section
                    path.write_text(yaml.safe_dump(data))
                spent.update(seconds=0.0, vetoes=0)
                start = time.perf_counter()
                summary = build.run_build(load_config(path))
                row[name] = {"build_s": round(time.perf_counter() - start, 3),
                             "guards_s": round(spent["seconds"], 3),
                             "vetoes": spent["vetoes"], "triplets": summary.triplets}
            row["guards_share_of_build"] = round(row["on"]["guards_s"] / row["on"]["build_s"], 4)
            row["build_on_over_off"] = round(row["on"]["build_s"] / row["off"]["build_s"], 3)
            results[str(size)] = row
    print(json.dumps({"benchmark": "guards", "sizes": results,
                      "torch_threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
                                 f"torch {torch.__version__}"}, indent=1))


if __name__ == "__main__":
    main()
