"""The demo corpus is data the demo and later benchmarks rely on: check its promised shape."""

import json
from collections import Counter

import pytest

from tests.conftest import REPO_ROOT

CORPUS = REPO_ROOT / "data" / "demo" / "demo.jsonl"


@pytest.fixture(scope="module")
def corpus():
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines()]


def test_size_and_directions(corpus):
    directions = Counter((r["src_lang"], r["tgt_lang"]) for r in corpus)
    assert len(corpus) >= 150
    assert len(directions) >= 2 and min(directions.values()) >= 50
    assert len({(r["src_lang"], r["src"]) for r in corpus}) == len(corpus)


def test_every_row_has_reference_two_different_systems_and_a_label(corpus):
    for row in corpus:
        assert row["ref"].strip() and row["system_a"].strip() and row["system_b"].strip()
        assert row["system_a"] != row["system_b"]
        assert isinstance(row["delta"], float) and row["delta"] != 0


def test_the_better_system_varies_and_some_pairs_are_close(corpus):
    for direction in {(r["src_lang"], r["tgt_lang"]) for r in corpus}:
        rows = [r for r in corpus if (r["src_lang"], r["tgt_lang"]) == direction]
        a_better = sum(r["delta"] > 0 for r in rows) / len(rows)
        assert 0.3 <= a_better <= 0.7
        assert sum(abs(r["delta"]) <= 0.5 for r in rows) >= 5
