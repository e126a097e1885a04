"""Pick chosen/rejected pairs per source and write their prompt.

This module grows with the scoring stage; for now pairs come from human labels (ALMA-R's
`Delta`): the preferred system's output is chosen, the other rejected. Every source that yields
no pair lands in the dropped table with a reason.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from cpo_data import schema
from cpo_data.config import SelectConfig
from cpo_data.langs import language_name

NO_HUMAN_LABEL = "no_human_label"
IDENTICAL_TEXTS = "identical_texts"


def render_prompt(template: str, src_lang: str, tgt_lang: str, src: str) -> str:
    """Fill a prompt template; {Src}/{Tgt} are English language names as ALMA writes them."""
    return template.format(
        Src=language_name(src_lang), Tgt=language_name(tgt_lang), src=src,
        src_lang=src_lang, tgt_lang=tgt_lang,
    )


def triplet_id(source_id: str, chosen: str, rejected: str) -> str:
    """Stable id of one pair: the same source and texts always give the same id."""
    return hashlib.sha256(f"{source_id}\n{chosen}\n{rejected}".encode()).hexdigest()[:20]


def select_by_human_label(sources: pa.Table, config: SelectConfig) -> tuple[pa.Table, pa.Table]:
    """Triplets from the human labels in a sources table, and the sources left out."""
    sources = schema.validate(sources, schema.SOURCES, what="sources")
    triplets, dropped = [], []
    for row in sources.to_pylist():
        outputs = {s["system"]: s["text"] for s in row["systems"]}
        base = {"source_id": row["source_id"], "lang_pair": row["lang_pair"]}
        if not config.use_human_labels or row["human_preferred"] is None:
            dropped.append({**base, "reason": NO_HUMAN_LABEL, "detail": None})
            continue
        chosen_system, rejected_system = row["human_preferred"], row["human_dispreferred"]
        chosen, rejected = outputs[chosen_system], outputs[rejected_system]
        if chosen == rejected:
            detail = f"{chosen_system} and {rejected_system} gave the same text"
            dropped.append({**base, "reason": IDENTICAL_TEXTS, "detail": detail})
            continue
        triplets.append({
            "id": triplet_id(row["source_id"], chosen, rejected),
            **base,
            "src_lang": row["src_lang"],
            "tgt_lang": row["tgt_lang"],
            "src": row["src"],
            "prompt": render_prompt(config.prompt_template, row["src_lang"], row["tgt_lang"],
                                    row["src"]),
            "chosen": chosen,
            "rejected": rejected,
            "chosen_system": chosen_system,
            "rejected_system": rejected_system,
            "chosen_score": None,
            "rejected_score": None,
            "margin": None,
            "chosen_scores": [],
            "rejected_scores": [],
            "selected_by": "human_label",
        })
    return (pa.Table.from_pylist(triplets, schema=schema.TRIPLETS),
            pa.Table.from_pylist(dropped, schema=schema.DROPPED))
