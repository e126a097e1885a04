"""Candidates per second from a served model against `max_concurrency`: the endpoint generator
(the real `openai` client, over HTTP) against the test chat-completions server on 127.0.0.1,
which holds every answer for a fixed `--delay-s` (a model's latency), so the ideal rate is
concurrency / delay. Each concurrency sends `--waves` x concurrency requests (so each would
take waves x delay at the ideal rate, with no partly filled last wave), one concurrency after
the other; the ratios are against concurrency 1. The server runs in a process of its own (in
ours it would share the interpreter's lock with the client), and a first request, not
counted, opens the client's imports. The goal (issue 20):
near-linear to 32.

    .venv/bin/python bench/endpoint.py [--waves 25] [--delay-s 0.2] [--concurrency 1 8 32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

from cpo_data.backends.openai_generate import EndpointGenerator
from cpo_data.config_endpoint import EndpointConfig
from cpo_data.generate import Request
from cpo_data.sources import source_id


def requests(n: int) -> list[Request]:
    texts = [f"Satz Nummer {i}: der Zug fährt um {i % 24} Uhr ab." for i in range(n)]
    return [Request(source_id("de", "en", t), "de", "en", t) for t in texts]


SERVE = """
import sys, time
from cpo_data.chat_server import ChatServer
server = ChatServer(delay_s=float(sys.argv[1])).start()
print(server.url, flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def served(delay_s: float):
    """The test server in a child process, answering after `delay_s`; its URL."""
    child = subprocess.Popen([sys.executable, "-c", SERVE, str(delay_s)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        yield child.stdout.readline().strip()
    finally:
        child.stdin.close()
        child.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waves", type=int, default=25)
    parser.add_argument("--delay-s", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    args = parser.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    rows = []
    with served(args.delay_s) as url:
        warm = EndpointConfig(name="bench", model="m", base_url=url, api_key_env=None)
        EndpointGenerator(warm).generate(requests(1))
        for concurrency in args.concurrency:
            n = concurrency * args.waves
            config = EndpointConfig(name="bench", model="m", base_url=url,
                                    api_key_env=None, max_concurrency=concurrency)
            generator = EndpointGenerator(config)
            started = time.perf_counter()
            results = generator.generate(requests(n))
            seconds = time.perf_counter() - started
            assert all(r.failed is None for r in results)
            rows.append({"concurrency": concurrency, "requests": n,
                         "seconds": round(seconds, 3),
                         "candidates_per_second": round(n / seconds, 2),
                         "ideal_per_second": round(concurrency / args.delay_s, 2)})
    base = rows[0]["candidates_per_second"]
    for row in rows:
        row["speedup_vs_first"] = round(row["candidates_per_second"] / base, 2)
        row["of_ideal"] = round(row["candidates_per_second"] / row["ideal_per_second"], 3)
    print(json.dumps({"benchmark": "endpoint", "delay_s": args.delay_s, "rows": rows,
                      "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}, indent=1))


if __name__ == "__main__":
    main()
