"""The whole build, end to end, through the Prefect flow and without it, as the sources grow.

Tiny local models: a Llama-style causal LM translates (greedy, a few new tokens), a CometKiwi-
style checkpoint and chrF score, pairs are ranked by kiwi. The sources cycle the 180 demo rows,
each repeat numbered so that every source is distinct (sources collapse duplicates).

Per size, COLD builds of the same config, each into its own fresh work_dir and store:
`build_triplets` (the Prefect flow, tasks per shard) and `run_build` (the same stages in a plain
loop), `--repeats` of each, best kept. Their difference is what Prefect costs; time(N) /
time(smallest) against N / smallest says whether the build grows linearly. Each build's time is
also split into the seconds inside the stage functions both paths call (generate, score, select
and publish) and the rest. Prefect's temporary server starts once per process, in a warm-up
build after the models are loaded; it is reported apart and excluded from every size. Last, both
paths rerun the largest size over their finished work. Prints one JSON object.

    .venv/bin/python bench/build.py [--sizes 1000 2000 4000 8000] [--max-new-tokens 8]
                                    [--shard-size 1000] [--repeats 2] [--torch-threads N]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")

import psutil  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from cpo_data import build, store  # noqa: E402
from cpo_data.config import load_config  # noqa: E402
from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet  # noqa: E402
from pipelines.demo import REPO_ROOT  # noqa: E402

WARM_UP_SOURCES = 20
STAGES = ("generate_shard", "score_shard", "select_and_publish")


# ---- inputs ------------------------------------------------------------------------------------

def source_rows(n: int) -> list[dict]:
    """n distinct sources: the demo rows over and over, repeat k numbered " (k)" in the source
    and in every translation of it, as a number in a real sentence would carry over."""
    demo = [json.loads(line) for line in
            (REPO_ROOT / "data/demo/demo.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = []
    for i in range(n):
        row, repeat = dict(demo[i % len(demo)]), i // len(demo)
        if repeat:
            row["id"] = f"{row['id']}-{repeat}"
            for key in ("src", "ref", "system_a", "system_b"):
                row[key] = f"{row[key]} ({repeat})"
        rows.append(row)
    return rows


def write_config(folder: Path, models: dict[str, str], rows: list[dict],
                 args: argparse.Namespace) -> Path:
    """A build YAML in `folder`, with its own sources file, work_dir and store."""
    folder.mkdir(parents=True)
    (folder / "sources.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = {
        "sources": [{"path": "sources.jsonl", "src_lang_column": "src_lang",
                     "tgt_lang_column": "tgt_lang",
                     "systems": {"system_a": "system_a", "system_b": "system_b"},
                     "label_column": "delta", "label_positive": "system_a",
                     "label_negative": "system_b"}],
        "generate": {"include_reference": True,
                     "models": [{"name": "tiny", "model": models["causal"],
                                 "max_new_tokens": args.max_new_tokens, "strategy": "greedy"}]},
        "score": {"scorers": [{"name": "kiwi", "model": models["kiwi"]},
                              {"name": "chrf", "kind": "chrf"}]},
        "select": {"use_human_labels": False, "rank_by": "kiwi"},
        "publish": {"uri": "store", "name": "bench"},
        "work_dir": "work",
        "shard_size": args.shard_size,
    }
    path = folder / "build.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


# ---- measuring ---------------------------------------------------------------------------------

def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class StageClock:
    """Seconds spent inside `cpo_data.build`'s stage functions. Both paths call them through the
    module (the flow's tasks as `build.generate_shard`, `run_build` by its global name), so
    wrapping the module's attributes times the same work in both; the rest of a flow build is
    Prefect and the content keys."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        for name in STAGES:
            setattr(build, name, self._wrap(name, getattr(build, name)))

    def _wrap(self, name: str, fn):
        @functools.wraps(fn)
        def timed_stage(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start

        return timed_stage

    def take(self) -> dict[str, float]:
        """The seconds since the last take, and start again."""
        taken, self.seconds = self.seconds, dict.fromkeys(STAGES, 0.0)
        return taken


class Server:
    """Prefect's temporary server, a child process of ours. After a flow returns it goes on
    working (events, logs, state changes) and on 2 cores that work slows whatever runs next, so
    every timed build starts on a quiet server, and the flow is charged the server's CPU time."""

    def __init__(self) -> None:
        found = [p for p in psutil.Process().children(recursive=True)
                 if "prefect.server" in " ".join(p.cmdline())]
        if len(found) != 1:
            raise RuntimeError(f"expected one Prefect server child process, found {found}")
        self.process = found[0]

    def cpu_s(self) -> float:
        times = self.process.cpu_times()
        return times.user + times.system

    def settle(self, quiet: float = 0.05, step: float = 0.25, limit: float = 300.0) -> float:
        """Wait until the server uses under `quiet` of a core for four steps running; returns
        how long it was busy (the quiet steps that prove it idle are not counted)."""
        start = time.perf_counter()
        calm, before = 0, self.cpu_s()
        while calm < 4 and time.perf_counter() - start < limit:
            time.sleep(step)
            now = self.cpu_s()
            calm = calm + 1 if (now - before) / step < quiet else 0
            before = now
        return max(0.0, time.perf_counter() - start - calm * step)


# ---- the two paths -----------------------------------------------------------------------------

def run_flow(config: Path) -> dict:
    from pipelines.build import build_triplets

    return build_triplets(str(config), retries=0)


def run_plain(config: Path) -> dict:
    # Loading the YAML is inside the timing, as it is inside the flow.
    return dataclasses.asdict(build.run_build(load_config(config), progress=lambda _: None))


def timed_build(path: str, config: Path, server: Server, clock: StageClock) -> tuple[dict, dict]:
    """One build on a quiet server: its summary, and its wall time split into the stages and
    the rest; for the flow also the server's CPU time during and after it, and how long the
    server stayed busy after the flow returned."""
    server.settle()
    cpu_before = server.cpu_s()
    clock.take()
    summary, seconds = timed(lambda: (run_flow if path == "flow" else run_plain)(config))
    stages = clock.take()
    measures = {"s": seconds, "stages_s": sum(stages.values()),
                "outside_stages_s": seconds - sum(stages.values()),
                **{f"{name}_s": value for name, value in stages.items()}}
    if path == "flow":
        measures["server_busy_after_s"] = server.settle()
        measures["server_cpu_s"] = server.cpu_s() - cpu_before
    return summary, measures


def triplet_ids(config: Path) -> set[str]:
    return set(store.read_triplets_table(str(config.parent / "store"), name="bench")
               .column("id").to_pylist())


def rounded(measures: dict[str, float]) -> dict[str, float]:
    return {key: round(value, 2) for key, value in measures.items()}


# ---- the runs ----------------------------------------------------------------------------------

def one_size(folder: Path, models: dict[str, str], n: int, first: int, server: Server,
             clock: StageClock, args: argparse.Namespace) -> dict:
    """`args.repeats` cold flow builds and as many cold plain builds of n sources, each into its
    own work_dir and store; the fastest of each is kept (noise on a shared machine only ever
    adds time). The order alternates so that neither path always runs second."""
    rows = source_rows(n)
    runs: dict[str, list[dict]] = {"flow": [], "plain": []}
    summaries, configs, orders = {}, {}, []
    for repeat in range(args.repeats):
        order = ["flow", "plain"] if (first + repeat) % 2 == 0 else ["plain", "flow"]
        orders.append(",".join(order))
        for path in order:
            configs[path] = write_config(folder / f"{n}-{path}-{repeat}", models, rows, args)
            summaries[path], measures = timed_build(path, configs[path], server, clock)
            runs[path].append(measures)
    best = {path: min(measured, key=lambda m: m["s"]) for path, measured in runs.items()}
    flow_s, plain_s = best["flow"]["s"], best["plain"]["s"]
    flow = summaries["flow"]
    return {
        "sources": n, "shards": flow["shards"], "candidates": flow["candidates"],
        "kiwi_pairs_scored": flow["scored"].get("kiwi", 0), "triplets": flow["triplets"],
        "orders": orders, "flow_s": round(flow_s, 2), "plain_s": round(plain_s, 2),
        "flow_runs_s": [round(m["s"], 2) for m in runs["flow"]],
        "plain_runs_s": [round(m["s"], 2) for m in runs["plain"]],
        "flow_s_per_1k": round(flow_s * 1000 / n, 2),
        "plain_s_per_1k": round(plain_s * 1000 / n, 2),
        "prefect_share": round((flow_s - plain_s) / flow_s, 3),
        "flow_best": rounded(best["flow"]), "plain_best": rounded(best["plain"]),
        # The two paths must build the same thing, or the comparison means nothing.
        "same_triplets": (flow["triplets"] == summaries["plain"]["triplets"]
                          and triplet_ids(configs["flow"]) == triplet_ids(configs["plain"])),
        "_configs": configs,
    }


def add_growth(results: list[dict]) -> None:
    """Growth against the smallest size; growth / size ratio is 1.0 for a linear build."""
    base = results[0]
    for row in results:
        size_ratio = row["sources"] / base["sources"]
        row["size_ratio"] = round(size_ratio, 2)
        for path in ("flow", "plain"):
            growth = row[f"{path}_s"] / base[f"{path}_s"]
            row[f"{path}_growth"] = round(growth, 2)
            row[f"{path}_growth_per_size"] = round(growth / size_ratio, 2)


def warm_rerun(configs: dict[str, Path], server: Server, clock: StageClock) -> dict:
    """Both paths again on the largest size, over their own finished work: the flow finds every
    shard in its task cache, the plain loop every candidate and score in the content caches."""
    flow, flow_measures = timed_build("flow", configs["flow"], server, clock)
    plain, plain_measures = timed_build("plain", configs["plain"], server, clock)
    return {"sources": flow["sources"], "flow_s": round(flow_measures["s"], 2),
            "plain_s": round(plain_measures["s"], 2),
            "flow_shards_reused": flow["shards_reused"], "flow_generated": flow["generated"],
            "plain_generated": plain["generated"], "plain_scored": plain["scored"]}


def warm_up(folder: Path, models: dict[str, str], clock: StageClock,
            args: argparse.Namespace) -> tuple[dict, Server]:
    """Load the models (cached per process), then build a few sources through the flow (this
    starts Prefect's temporary server), the plain loop, and the flow again. Nothing here is in
    the per-size times; the first flow build less the second is the server's start-up."""
    from cpo_data.backends.comet_score import load_scorer
    from cpo_data.backends.hf_generate import load_generator

    rows = source_rows(WARM_UP_SOURCES)
    configs = [write_config(folder / f"warm-{k}", models, rows, args) for k in range(3)]
    config = load_config(configs[0])
    _, models_s = timed(lambda: ([load_generator(m) for m in config.generate.models],
                                 [load_scorer(s) for s in config.score.scorers]))
    _, first_flow_s = timed(lambda: run_flow(configs[0]))
    server = Server()
    server.settle()
    _, plain = timed_build("plain", configs[1], server, clock)
    _, flow = timed_build("flow", configs[2], server, clock)
    return {"sources": WARM_UP_SOURCES, "load_models_s": round(models_s, 2),
            "first_flow_s": round(first_flow_s, 2), "plain_s": round(plain["s"], 2),
            "second_flow_s": round(flow["s"], 2),
            "prefect_server_start_s": round(first_flow_s - flow["s"], 2)}, server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 4000, 8000])
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=2,
                        help="cold builds per path and size; the fastest is kept")
    parser.add_argument("--torch-threads", type=int,
                        help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--no-warm-rerun", action="store_true")
    args = parser.parse_args()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    sizes = sorted(args.sizes)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        # Prefect's own database and temporary server live here and go with the folder: the
        # benchmark neither reads nor grows ~/.prefect. Set before Prefect is first imported.
        os.environ["PREFECT_HOME"] = str(folder / "prefect-home")
        models = {"causal": str(build_tiny_causal_lm(folder / "causal")),
                  "kiwi": str(build_tiny_comet(folder / "kiwi", "kiwi"))}
        clock = StageClock()
        warm, server = warm_up(folder, models, clock, args)
        results = [one_size(folder, models, n, i, server, clock, args)
                   for i, n in enumerate(sizes)]
        add_growth(results)
        largest = results[-1]["_configs"]
        rerun = None if args.no_warm_rerun else warm_rerun(largest, server, clock)
        for row in results:
            del row["_configs"]

    print(json.dumps({
        "benchmark": "build",
        "models": "tiny Llama-style 2x32 (greedy) + tiny CometKiwi-style XLM-R 2x32 + chrF",
        "max_new_tokens": args.max_new_tokens, "shard_size": args.shard_size,
        "repeats": args.repeats, "warm_up": warm, "sizes": results,
        "warm_rerun_largest": rerun, "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
    }, indent=1))


if __name__ == "__main__":
    # Keeps the library's own INFO lines off the console in both paths alike; Prefect's logging
    # (to the console and to its API) is left as a user of the flow gets it.
    logging.getLogger("cpo_data").setLevel(logging.WARNING)
    main()
