"""Candidates per second: batched, length-sorted generation against one source at a time.

Same tiny Llama-style model, same 512 sources, 4 candidates each (beam search, 4 beams, so the
outputs are deterministic and can be compared exactly). Prints one JSON object.

    .venv/bin/python bench/generate.py [--sources 512] [--max-new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from cpo_data.backends.hf_generate import load_generator  # noqa: E402
from cpo_data.config import GeneratorConfig  # noqa: E402
from cpo_data.generate import Request  # noqa: E402
from cpo_data.sources import source_id  # noqa: E402
from cpo_data.testing import build_tiny_causal_lm, training_texts  # noqa: E402


def sources(n: int) -> list[Request]:
    texts = [t for t in training_texts() if len(t.split()) >= 4]
    picked = [f"{texts[i % len(texts)]} ({i})" for i in range(n)]
    return [Request(source_id("de", "en", t), "de", "en", t) for t in picked]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sources", type=int, default=512)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--token-budget", type=int, default=65536)
    args = parser.parse_args()

    requests = sources(args.sources)
    with tempfile.TemporaryDirectory() as folder:
        build_tiny_causal_lm(f"{folder}/model", hidden_size=64, layers=2)
        config = GeneratorConfig(
            name="tiny", model=f"{folder}/model", strategy="beam", num_beams=args.candidates,
            num_candidates=args.candidates, max_new_tokens=args.max_new_tokens,
            token_budget=args.token_budget, max_batch_size=64)
        generator = load_generator(config)
        generator.generate(requests[:8])  # warm-up: first-call allocations

        start = time.perf_counter()
        batched = generator.generate(requests)
        batched_s = time.perf_counter() - start
        batches = generator.batches

        start = time.perf_counter()
        single = [generator.generate([r])[0] for r in requests]
        single_s = time.perf_counter() - start

    same = sum(a.texts == b.texts for a, b in zip(batched, single, strict=True))
    candidates = args.sources * args.candidates
    print(json.dumps({
        "benchmark": "generate",
        "sources": args.sources,
        "candidates_per_source": args.candidates,
        "max_new_tokens": args.max_new_tokens,
        "batched_candidates_per_s": round(candidates / batched_s, 1),
        "one_at_a_time_candidates_per_s": round(candidates / single_s, 1),
        "speedup": round(single_s / batched_s, 2),
        "batches": batches - 1,
        "identical_outputs": f"{same}/{args.sources}",
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
    }))


if __name__ == "__main__":
    main()
