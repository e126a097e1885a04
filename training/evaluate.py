"""Translation quality of a trained model on a small test set with references.

The trained model translates through the generation stage's own backend (same prompt handling,
batching and clean-up as candidate generation), and the outputs are scored with sacrebleu's
corpus BLEU and chrF and, when configured, a COMET scorer from the scoring stage.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from pathlib import Path

from cpo_data.config import GeneratorConfig
from cpo_data.generate import Request
from cpo_data.score import ScoreItem
from cpo_data.sources import load_sources
from training.config import TrainConfig

log = logging.getLogger("cpo_data.training")

TRANSLATIONS_FILE = "test_translations.jsonl"


def _bleu_tokenizer(tgt_lang: str) -> str:
    # sacrebleu's 13a splits no Chinese words; its zh tokenizer is the WMT convention.
    return "zh" if tgt_lang.startswith("zh") else "13a"


def _generator_config(config: TrainConfig, name: str, model: str,
                      adapter: str | None) -> GeneratorConfig:
    return GeneratorConfig(name=name, model=model, adapter=adapter, kind="causal",
                           prompt_template=config.eval.prompt_template,
                           max_new_tokens=config.eval.max_new_tokens, device=config.device)


def _translate(generator_config: GeneratorConfig, requests: list[Request]) -> list[str]:
    from cpo_data.backends.hf_generate import load_generator, release_models

    try:
        generated = load_generator(generator_config).generate(requests)
    finally:
        release_models()  # the next model evaluated (or trained) needs the memory
    return [g.texts[0] for g in generated]


def _scores(config: TrainConfig, rows: list[dict], outputs: list[str],
            scorer=None) -> dict[str, dict]:  # noqa: ANN001 - a Scorer (eval.comet)
    import sacrebleu

    comet_scores: list[float] = []
    if scorer is not None:
        items = [ScoreItem(r["src"], mt, r["ref"] if scorer.needs_reference else None)
                 for r, mt in zip(rows, outputs, strict=True)]
        comet_scores = [result.score for result in scorer.score(items)]
    groups: dict[str, list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[f"{row['src_lang']}-{row['tgt_lang']}"].append(i)
    report = {}
    for pair, indices in sorted(groups.items()):
        hypotheses = [outputs[i] for i in indices]
        references = [[rows[i]["ref"] for i in indices]]
        tgt = rows[indices[0]]["tgt_lang"]
        scores = {
            "rows": len(indices),
            "bleu": sacrebleu.corpus_bleu(hypotheses, references,
                                          tokenize=_bleu_tokenizer(tgt)).score,
            "chrf": sacrebleu.corpus_chrf(hypotheses, references).score,
        }
        if comet_scores:
            scores[config.eval.comet.name] = sum(comet_scores[i] for i in indices) / len(indices)
        report[pair] = scores
    return report


def load_test_rows(config: TrainConfig) -> list[dict]:
    """The test set's first `test_rows` sources that have a reference."""
    sources = load_sources(config.eval.test_set).table.to_pylist()
    rows = [r for r in sources if r.get("ref")][: config.eval.test_rows]
    if not rows:
        raise ValueError(f"eval.test_set: {config.eval.test_set.path} has no rows with a "
                         "reference")
    return rows


def translation_quality(config: TrainConfig, model_dir: str) -> dict[str, dict]:
    """Scores per model (`trained`, and `base` with `eval.compare_base`) and language pair:
    rows, corpus BLEU and chrF (and COMET). The translations themselves go to
    `test_translations.jsonl` beside the model folder, one line per test source."""
    rows = load_test_rows(config)
    requests = [Request(r["source_id"], r["src_lang"], r["tgt_lang"], r["src"]) for r in rows]
    if config.finetune == "lora":
        trained = _generator_config(config, "trained", config.model, model_dir)
    else:
        trained = _generator_config(config, "trained", model_dir, None)
    log.info("translating %d test sources with the trained model", len(rows))
    outputs = {"trained": _translate(trained, requests)}
    if config.eval.compare_base:
        base = _generator_config(config, "base", config.model, config.lora.adapter
                                 if config.finetune == "lora" else None)
        outputs["base"] = _translate(base, requests)
    lines = [{"source_id": r["source_id"], "lang_pair": f"{r['src_lang']}-{r['tgt_lang']}",
              "src": r["src"], "ref": r["ref"], **{name: texts[i]
                                                   for name, texts in outputs.items()}}
             for i, r in enumerate(rows)]
    path = Path(model_dir).parent / TRANSLATIONS_FILE
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines),
                    encoding="utf-8")
    scorer = None
    if config.eval.comet is not None:  # built once for the trained and the base outputs
        from cpo_data.backends.comet_score import load_scorer

        scorer = load_scorer(config.eval.comet)
    return {name: _scores(config, rows, texts, scorer) for name, texts in outputs.items()}
