"""Where a build's memory goes: the demo recipe's plain loop (`run_build`) with its resident
set sampled every 0.2 s and each sample counted to the stage running then (reading the
sources, generating, scoring, selecting, the report), plus the resident set after every 25th
shard's selection. Complements `bench/build_memory.py`, which gives only the peak. Prints one
JSON object.

    .venv/bin/python bench/memory_stages.py [--sources 300000] [--shard-size 1000]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def _rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=300_000)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    spec = importlib.util.spec_from_file_location("build_memory", BENCH / "build_memory.py")
    memory = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory)

    from cpo_data import build
    from pipelines.project import load_project

    stage = ["start"]
    peaks: dict[str, float] = {}
    selected: list[tuple[int, float]] = []

    def sample() -> None:
        while True:
            peaks[stage[0]] = max(peaks.get(stage[0], 0.0), _rss_mb())
            time.sleep(0.2)

    def timed(name: str, label: str) -> None:
        function = getattr(build, name)

        def wrapper(*args, **kwargs):
            stage[0] = label
            try:
                return function(*args, **kwargs)
            finally:
                stage[0] = f"after {label}"
        setattr(build, name, wrapper)

    for name, label in (("start_build", "read sources"), ("staged_generate", "generate"),
                        ("staged_score", "score"), ("_compare_with_previous", "compare"),
                        ("report_page", "report")):
        timed(name, label)
    select = build._select_shard

    def counted(*args, **kwargs):
        stage[0] = "select"
        result = select(*args, **kwargs)
        if (len(selected) + 1) % 25 == 0 or not selected:
            selected.append((len(selected) + 1, round(_rss_mb(), 1)))
        else:
            selected.append(None)
        return result

    build._select_shard = counted
    threading.Thread(target=sample, daemon=True).start()
    with tempfile.TemporaryDirectory(prefix="cpo-data-stages-") as tmp:
        path = memory.write_project(Path(tmp) / "project", args.sources, args.shard_size)
        os.chdir(path.parent)
        started = time.perf_counter()
        build.run_build(load_project(str(path)).need_build())
        seconds = time.perf_counter() - started
        time.sleep(0.5)
    print(json.dumps({"sources": args.sources, "shard_size": args.shard_size,
                      "seconds": round(seconds, 1),
                      "peak_rss_mb_by_stage": {k: round(v, 1) for k, v in peaks.items()},
                      "rss_mb_after_shard": [s for s in selected if s]}, indent=1))


if __name__ == "__main__":
    main()
