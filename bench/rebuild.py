"""A rebuild whose work is all cached, in a fresh process: models loaded and seconds, for two
versions of the library in one run.

Per library tree (`--trees`, each a checkout's root; default: this one), a cold build of N
sources into its own folder, then the same build again in a NEW process (as a scheduled
refresh or a restarted worker starts): the content caches hold every candidate and score, so
whatever that rerun loads is loading for no work. Both runs use the plain loop (`run_build`),
so Prefect's task cache plays no part; each tree gets its own folder because the cache
namespaces (the backend identities) may differ between versions. Tiny local models (the
inputs of bench/build.py): loading them costs a fraction of a second, so the seconds show the
overhead around the work; with ALMA-13B and two XXL COMET models each load is minutes.
Prints one JSON object.

    .venv/bin/python bench/rebuild.py [--sources 8000] [--trees OLD_CHECKOUT .]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Run in the child process: one build, with the loads counted.
CHILD = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from collections import Counter
from cpo_data import build
from cpo_data.backends import comet_score, hf_generate
from cpo_data.config import load_config
loads = Counter()
for module, name in ((hf_generate, "load_generator"), (comet_score, "load_scorer")):
    real = getattr(module, name)
    setattr(module, name, lambda config, _real=real, _name=name:
            loads.update([_name]) or _real(config))
start = time.perf_counter()
summary = build.run_build(load_config(sys.argv[1]))
print(json.dumps({"seconds": round(time.perf_counter() - start, 2), "loads": dict(loads),
                  "generated": summary.generated, "triplets": summary.triplets,
                  "library": build.__file__}))
"""


def run_child(tree: Path, config: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    # cwd too: `python -c` puts its working directory first on sys.path.
    done = subprocess.run([sys.executable, "-c", CHILD, str(config)], env=env, cwd=tree,
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    from build import source_rows, write_config  # bench/build.py: the same inputs

    from cpo_data.testing import build_tiny_causal_lm, build_tiny_comet

    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--trees", nargs="+", default=[str(HERE.parent)])
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cpo-rebuild-"))
    models = {"causal": str(build_tiny_causal_lm(root / "models" / "causal")),
              "kiwi": str(build_tiny_comet(root / "models" / "kiwi"))}
    rows = source_rows(args.sources)
    results = {}
    for number, tree in enumerate(Path(t).resolve() for t in args.trees):
        config = write_config(root / f"tree-{number}", models, rows, args)
        cold = run_child(tree, config)
        rerun = run_child(tree, config)
        assert rerun["triplets"] == cold["triplets"]
        assert Path(cold["library"]).is_relative_to(tree), cold["library"]
        results[str(tree)] = {"cold": cold, "cached_rerun_in_a_new_process": rerun}
    reruns = [r["cached_rerun_in_a_new_process"]["seconds"] for r in results.values()]
    print(json.dumps({"sources": args.sources, "shard_size": args.shard_size,
                      "results": results,
                      "rerun_ratio_first_over_last": round(reruns[0] / reruns[-1], 3)},
                     indent=2))


if __name__ == "__main__":
    main()
