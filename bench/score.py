"""Scoring speed against unbabel-comet's own `model.predict(...)`, same checkpoint, same rows.

Three pools built from the demo corpus (each source gets candidates):
  (a) distinct: 4 different candidates per source, no duplicate pair;
  (b) realistic: 3 provided systems (ref, system_a, system_b) plus 4 sampled candidates drawn
      from a small set of variants, so sampling repeats itself and the providers;
  (c) refresh: pool (b) again when 90% of its distinct pairs are already in the score cache.
`predict()` scores every row of the pool each time, as a script calling it directly does; ours is
`score_candidates` (dedupe, cache, in-process batches). At float32 scores must agree to 1e-5;
`--dtype bfloat16|float16` scores ours in half precision against float32 `predict()` (COMET's
own precision), so `max_abs_diff` is then the drift half precision causes.

    .venv/bin/python bench/score.py [--sources 180] [--hidden 32] [--layers 2]
                                    [--kind kiwi|xcomet] [--device cpu|cuda] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from cpo_data import schema  # noqa: E402
from cpo_data.backends.comet_score import load_scorer  # noqa: E402
from cpo_data.cache import ContentCache  # noqa: E402
from cpo_data.config import ScoreConfig, ScorerConfig, SourcesConfig  # noqa: E402
from cpo_data.score import ScoreItem, item_key, score_candidates  # noqa: E402
from cpo_data.sources import load_sources  # noqa: E402
from cpo_data.testing import build_tiny_comet  # noqa: E402
from pipelines.demo import REPO_ROOT  # noqa: E402


def demo_sources(n: int) -> pa.Table:
    config = SourcesConfig(path=str(REPO_ROOT / "data/demo/demo.jsonl"),
                           src_lang_column="src_lang", tgt_lang_column="tgt_lang",
                           systems={"system_a": "system_a", "system_b": "system_b"})
    return load_sources(config).table.slice(0, n)


def pool(sources: pa.Table, kind: str, seed: int = 0) -> pa.Table:
    rng = random.Random(seed)
    rows = []
    for source in sources.to_pylist():
        outputs = {s["system"]: s["text"] for s in source["systems"]}
        provided = [source["ref"], outputs["system_a"], outputs["system_b"]]
        if kind == "distinct":
            texts = provided + [outputs["system_a"] + " Indeed."]
        else:  # 4 samples from a few variants: repeats among themselves and the providers
            variants = provided + [outputs["system_a"].rstrip(".") + "!"]
            texts = provided + [rng.choice(variants) for _ in range(4)]
        for k, text in enumerate(texts):
            rows.append({"source_id": source["source_id"], "text": text, "systems": [f"s{k}"],
                         "generator": None, "decoding": None})
    return pa.Table.from_pylist(rows, schema=schema.CANDIDATES)


GPUS = 0  # predict()'s Lightning device count: 1 with --device cuda, so both sides share it


def predict_all(model, candidates: pa.Table, sources: pa.Table) -> list[float]:
    src = dict(zip(sources.column("source_id").to_pylist(), sources.column("src").to_pylist(),
                   strict=True))
    samples = [{"src": src[c["source_id"]], "mt": c["text"]} for c in candidates.to_pylist()]
    return model.predict(samples, batch_size=16, gpus=GPUS, progress_bar=False).scores


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", type=int, default=180)
    parser.add_argument("--hidden", type=int, default=32, help="tiny encoder width")
    parser.add_argument("--layers", type=int, default=2, help="tiny encoder depth")
    parser.add_argument("--kind", choices=("kiwi", "xcomet"), default="kiwi",
                        help="CometKiwi- or XCOMET-style checkpoint (bfloat16 needs xcomet: the "
                        "tiny kiwi's layer mix has layer_norm, which COMET cannot run in bf16)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (predict() runs there too)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="our scorer's dtype; predict() stays at its own float32")
    args = parser.parse_args()
    import comet

    global GPUS
    GPUS = 1 if args.device.startswith("cuda") else 0

    sources = demo_sources(args.sources)
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = str(build_tiny_comet(f"{folder}/kiwi", args.kind, hidden_size=args.hidden,
                                          layers=args.layers))
        model = comet.load_from_checkpoint(checkpoint, local_files_only=True)
        scorer = load_scorer(ScorerConfig(name="kiwi", model=checkpoint, device=args.device,
                                          dtype=args.dtype))
        scorer.score([ScoreItem("warm", "up")])
        model.predict([{"src": "warm", "mt": "up"}], gpus=GPUS, progress_bar=False)

        for name, kind in (("a_distinct", "distinct"), ("b_realistic", "realistic")):
            candidates = pool(sources, kind)
            theirs, their_s = timed(lambda c=candidates: predict_all(model, c, sources))
            ours, our_s = timed(lambda c=candidates: score_candidates(
                c, sources, ScoreConfig(), [scorer]))
            diff = max(abs(a - b) for a, b in zip(ours.table.column("score").to_pylist(),
                                                   theirs, strict=True))
            results[name] = {"rows": candidates.num_rows,
                             "distinct_pairs": ours.report.distinct["kiwi"],
                             "predict_s": round(their_s, 3), "ours_s": round(our_s, 3),
                             "speedup": round(their_s / our_s, 2), "max_abs_diff": diff}

        # (c) refresh: 90% of pool (b)'s distinct pairs are cached from an earlier build.
        candidates = pool(sources, "realistic")
        cache_dir = f"{folder}/cache"
        src = dict(zip(sources.column("source_id").to_pylist(),
                       sources.column("src").to_pylist(), strict=True))
        distinct = list(dict.fromkeys(ScoreItem(src[c["source_id"]], c["text"])
                                      for c in candidates.to_pylist()))
        random.Random(1).shuffle(distinct)
        known = distinct[: int(len(distinct) * 0.9)]
        cache = ContentCache(cache_dir, "score", scorer.identity)  # the stage's own namespace
        cache.put_many({item_key(i): {"score": r.score, "error_spans": None}
                        for i, r in zip(known, scorer.score(known), strict=True)})
        theirs, their_s = timed(lambda: predict_all(model, candidates, sources))
        ours, our_s = timed(lambda: score_candidates(
            candidates, sources, ScoreConfig(cache_dir=cache_dir), [scorer]))
        diff = max(abs(a - b) for a, b in zip(ours.table.column("score").to_pylist(), theirs,
                                               strict=True))
        results["c_refresh_90pct_cached"] = {
            "rows": candidates.num_rows, "scored_now": ours.report.scored["kiwi"],
            "from_cache": ours.report.from_cache["kiwi"], "predict_s": round(their_s, 3),
            "ours_s": round(our_s, 3), "speedup": round(their_s / our_s, 2),
            "max_abs_diff": diff}

    size = f"{args.layers}x{args.hidden}"
    style = {"kiwi": "CometKiwi", "xcomet": "XCOMET"}[args.kind]
    print(json.dumps({"benchmark": "score", "checkpoint": f"tiny {style}-style (XLM-R {size})",
                      "device": args.device, "dtype": args.dtype, "predict_dtype": "float32",
                      "sources": args.sources, **results, "torch_threads": torch.get_num_threads(),
                      "machine": f"{platform.machine()}, {os.cpu_count()} cpus, "
                                 f"torch {torch.__version__}"}, indent=1))


if __name__ == "__main__":
    main()
