"""Peak memory of a build as the sources grow: the demo recipe (two provided systems ranked by
chrF, every guard on), through the Prefect flow and the plain loop, in one run.

Each build runs in a child process of its own (a fresh interpreter: nothing of an earlier
build is kept) with a fresh work_dir and store, and reports its own peak resident set
(`ru_maxrss`). The flow's Prefect server is a process of its own and is not counted: it is the
same size at any build size. The sources cycle the demo rows, each repeat numbered so that every
source is distinct (`bench/build.py`'s `source_rows`). The goal (issue 18): the largest size
within 1.3x of the smallest's peak on both paths. Prints one JSON object.

    .venv/bin/python bench/build_memory.py [--sizes 10000 100000 1000000]
                                           [--shard-sizes 1000] [--paths flow loop]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent


def _source_rows(n: int) -> list[dict]:
    spec = importlib.util.spec_from_file_location("bench_build", BENCH / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.source_rows(n)


def write_project(folder: Path, n: int, shard_size: int) -> Path:
    """configs/demo.yaml's build over n distinct sources, in `folder`."""
    demo = yaml.safe_load((REPO_ROOT / "configs/demo.yaml").read_text(encoding="utf-8"))
    folder.mkdir(parents=True)
    with open(folder / "sources.jsonl", "w", encoding="utf-8") as out:
        for row in _source_rows(n):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    config = {key: demo[key] for key in ("sources", "generate", "score", "guards", "select")}
    config["sources"] = [{**demo["sources"][0], "path": "sources.jsonl"}]
    config.update(publish={"uri": "store", "name": "demo", "report": True}, work_dir="work",
                  shard_size=shard_size)
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def _vm_hwm_mb() -> float:
    """This process's own peak resident set (its address space's high-water mark)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def child(path: str, how: str) -> None:
    """One build (in this fresh process); prints its summary's counts and the peak RSS."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    if how == "flow":
        from pipelines.build import build_triplets
        from pipelines.cli import _prefect_server

        with _prefect_server():
            summary = build_triplets(path)
    else:
        import dataclasses

        from cpo_data import build
        from pipelines.project import load_project

        summary = dataclasses.asdict(build.run_build(load_project(path).need_build()))
    print(json.dumps({
        "seconds": round(time.perf_counter() - started, 1),
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent, so a
        # child forked while this script held a million source rows read that as its peak.
        "peak_rss_mb": _vm_hwm_mb(),
        "triplets": summary["triplets"], "sources": summary["sources"],
        "shards": summary["shards"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[1000])
    parser.add_argument("--paths", nargs="+", default=["flow", "loop"],
                        choices=["flow", "loop"])
    parser.add_argument("--child", nargs=2, metavar=("CONFIG", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="cpo-data-memory-") as tmp:
        env = dict(os.environ, PREFECT_HOME=str(Path(tmp) / "prefect-home"))
        env.pop("PREFECT_API_URL", None)
        for shard_size in args.shard_sizes:
            for n in args.sizes:
                for how in args.paths:
                    path = write_project(Path(tmp) / f"{how}-{n}-{shard_size}", n, shard_size)
                    done = subprocess.run([sys.executable, __file__, "--child", str(path), how],
                                          env=env, capture_output=True, text=True, check=False)
                    if done.returncode:
                        raise SystemExit(f"{how} {n}: exit {done.returncode}\n"
                                         f"{done.stderr[-3000:]}")
                    result = json.loads(done.stdout.strip().splitlines()[-1])
                    rows.append({"path": how, "sources": n, "shard_size": shard_size, **result})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ratios = {}
    for how in args.paths:
        for shard_size in args.shard_sizes:
            mine = [r for r in rows if r["path"] == how and r["shard_size"] == shard_size]
            if len(mine) > 1:
                ratios[f"{how}, shard {shard_size}: largest / smallest peak"] = round(
                    mine[-1]["peak_rss_mb"] / mine[0]["peak_rss_mb"], 2)
    print(json.dumps({"rows": rows, "ratios": ratios}, indent=2))


if __name__ == "__main__":
    main()
