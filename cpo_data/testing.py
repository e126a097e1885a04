"""Small local stand-ins used by the tests and benchmarks: nothing here downloads anything.

Later stages add tiny models, tokenizers and COMET checkpoints built on the spot.
"""

from __future__ import annotations

import pyarrow as pa

from cpo_data import schema
from cpo_data.config import ALMA_PROMPT
from cpo_data.select import render_prompt, triplet_id
from cpo_data.sources import source_id


def sample_triplets(rows_per_pair: int = 4, pairs: tuple[str, ...] = ("de-en", "en-de"),
                    seed: int = 0) -> pa.Table:
    """A valid triplets table with distinct, deterministic texts (seed changes the texts)."""
    rows = []
    for pair in pairs:
        src_lang, tgt_lang = pair.split("-")
        for i in range(rows_per_pair):
            src = f"source {seed}-{pair}-{i}: ein kleiner Satz mit Umlauten äöü"
            chosen, rejected = f"good translation {seed}-{i}", f"bad translation {seed}-{i}"
            sid = source_id(src_lang, tgt_lang, src)
            chosen_score, rejected_score = 0.9 - i / 100, 0.4 + i / 100
            rows.append({
                "id": triplet_id(sid, chosen, rejected),
                "source_id": sid,
                "lang_pair": pair,
                "src_lang": src_lang,
                "tgt_lang": tgt_lang,
                "src": src,
                "prompt": render_prompt(ALMA_PROMPT, src_lang, tgt_lang, src),
                "chosen": chosen,
                "rejected": rejected,
                "chosen_system": "system_a",
                "rejected_system": "system_b",
                "chosen_score": chosen_score,
                "rejected_score": rejected_score,
                "margin": chosen_score - rejected_score,
                "chosen_scores": [{"scorer": "chrf", "score": chosen_score}],
                "rejected_scores": [{"scorer": "chrf", "score": rejected_score}],
                "selected_by": "score",
            })
    return pa.Table.from_pylist(rows, schema=schema.TRIPLETS)


def sample_dropped(source_ids: list[str], reason: str = "single_candidate") -> pa.Table:
    """A dropped table naming `source_ids` with one reason."""
    rows = [{"source_id": s, "lang_pair": "de-en", "reason": reason, "detail": None}
            for s in source_ids]
    return pa.Table.from_pylist(rows, schema=schema.DROPPED)
