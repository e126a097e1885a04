"""Small local stand-ins used by the tests and benchmarks: nothing here downloads anything.

Tiny models, tokenizers and COMET checkpoints, built on the spot; `cpo_data.replicas` holds the
recipe's real repos in miniature (their classes, file layouts and hub ids).
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


# ---- tiny Hugging Face models, built locally in seconds ------------------------------------------

_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def training_texts() -> list[str]:
    """Text to train the tiny tokenizers on: the demo corpus, prompt words and language tags."""
    import json
    from pathlib import Path

    corpus = Path(__file__).resolve().parent.parent / "data" / "demo" / "demo.jsonl"
    texts = ["Translate this from German to English:", "Translate this from English to German:",
             "German: English: Czech: Icelandic: Chinese: Russian:", "user assistant system"]
    if corpus.is_file():
        for line in corpus.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts += [row["src"], row["ref"], row["system_a"], row["system_b"]]
    return texts


def train_tokenizer(extra_special_tokens: tuple[str, ...] = (), vocab_size: int = 600,
                    add_bos: bool = True):
    """A byte-level BPE tokenizer trained here, wrapped as a `PreTrainedTokenizerFast`.

    Byte-level so that every text (umlauts, newlines) round-trips through encode/decode.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=_SPECIALS + list(extra_special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator(training_texts(), trainer=trainer)
    if add_bos:
        bos = tokenizer.token_to_id("<s>")
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        pad_token="<pad>", additional_special_tokens=list(extra_special_tokens) or None,
        model_input_names=["input_ids", "attention_mask"],
    )


def _eos_after_text(tokenizer) -> None:
    """Seq2seq encoders read "text </s>", as Marian and M2M100 tokenizers write it."""
    from tokenizers import processors

    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A $B </s>", special_tokens=[("</s>", tokenizer.eos_token_id)])


def _save_seq2seq(model, tokenizer, path, decoder_start: int):
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.decoder_start_token_id = decoder_start
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_causal_lm(path, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                         chat_template: bool = False, tie_word_embeddings: bool = False):
    """A Llama-architecture causal LM with random weights, saved as an ordinary HF folder
    (`tie_word_embeddings`: the head shares the input embeddings, as Llama 3.2 1B's does)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = train_tokenizer()
    if chat_template:
        tokenizer.chat_template = (
            "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}"
        )
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def build_tiny_marian(path, seed: int = 0, d_model: int = 32, layers: int = 2):
    """A Marian-architecture encoder-decoder with random weights, saved as an HF folder."""
    import torch
    from transformers import MarianConfig, MarianMTModel

    tokenizer = train_tokenizer(add_bos=False)
    _eos_after_text(tokenizer)  # Marian starts decoding from the pad token
    config = MarianConfig(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers,
        decoder_layers=layers, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=d_model * 2, decoder_ffn_dim=d_model * 2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id, forced_eos_token_id=None,
        init_std=0.5,  # large random weights: outputs then depend on the source
    )
    torch.manual_seed(seed)
    return _save_seq2seq(MarianMTModel(config), tokenizer, path, tokenizer.pad_token_id)


def build_tiny_nllb(path, seed: int = 0, d_model: int = 32, layers: int = 2,
                    language_codes: tuple[str, ...] | None = None):
    """An NLLB-style model (M2M100 architecture) with random weights, saved as an HF folder.

    With `language_codes` unset the tokenizer is a real `NllbTokenizerFast` (all FLORES-200
    codes); with a tuple of codes it is a plain fast tokenizer carrying only those, as a pruned
    or custom model would.
    """
    import tempfile

    import torch
    from transformers import M2M100Config, M2M100ForConditionalGeneration, NllbTokenizerFast

    if language_codes is None:
        base = train_tokenizer(add_bos=False)
        with tempfile.TemporaryDirectory() as folder:
            base.save_pretrained(folder)
            tokenizer = NllbTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json",
                                          src_lang="eng_Latn", tgt_lang="deu_Latn")
    else:
        tokenizer = train_tokenizer(extra_special_tokens=language_codes, add_bos=False)
        _eos_after_text(tokenizer)
    config = M2M100Config(
        vocab_size=len(tokenizer), d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id, decoder_start_token_id=tokenizer.eos_token_id,
        init_std=0.5,  # large random weights: outputs then depend on the source
    )
    torch.manual_seed(seed)
    model = M2M100ForConditionalGeneration(config)
    return _save_seq2seq(model, tokenizer, path, tokenizer.eos_token_id)


# ---- tiny COMET checkpoints, built offline ----------------------------------------------


def xlmr_tokenizer(folder):
    """XLM-R's tokenizer layout, trained here: a sentencepiece unigram model with fairseq's
    special ids (<s> 0, <pad> 1, </s> 2, <unk> 3) as `sentencepiece.bpe.model`, wrapped as
    `XLMRobertaTokenizerFast` and saved into `folder`."""
    import io

    import sentencepiece as spm
    from transformers import XLMRobertaTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_writer=model, vocab_size=500,
        model_type="unigram", character_coverage=1.0, bos_id=0, pad_id=1, eos_id=2, unk_id=3,
        minloglevel=2,
    )
    (folder / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    tokenizer = XLMRobertaTokenizerFast(vocab_file=str(folder / "sentencepiece.bpe.model"))
    tokenizer.save_pretrained(folder)
    return tokenizer


def _tiny_xlmr_encoder(folder, max_tokens: int = 128, hidden_size: int = 32, layers: int = 2):
    """A sentencepiece tokenizer trained here and a tiny XLM-R config, saved as an HF folder.

    COMET rebuilds its encoder from this folder (config and tokenizer, no weights) whenever a
    checkpoint is loaded, exactly as it does with `xlm-roberta-large` from the hub.
    """
    from pathlib import Path

    from transformers import XLMRobertaConfig

    folder = Path(folder)
    tokenizer = xlmr_tokenizer(folder)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=hidden_size * 2,
        max_position_embeddings=max_tokens + 2,  # XLM-R positions start after the pad index
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config.save_pretrained(folder)
    return folder


def build_tiny_comet(path, kind: str = "kiwi", seed: int = 0, max_tokens: int = 128,
                     hidden_size: int = 32, layers: int = 2):
    """A COMET checkpoint folder (`checkpoints/model.ckpt` + `hparams.yaml`) with random weights.

    kind "kiwi": a CometKiwi-style UnifiedMetric reading [mt, src] (reference-free).
    kind "xcomet": an XCOMET-style metric with word-level error-span tagging.
    Returns the path of `checkpoints/model.ckpt`, as `comet.download_model` does.
    """
    from pathlib import Path

    import torch
    from comet.models import UnifiedMetric, XCOMETMetric

    path = Path(path)
    encoder = _tiny_xlmr_encoder(path / "encoder", max_tokens=max_tokens,
                                 hidden_size=hidden_size, layers=layers)
    common = dict(encoder_model="XLM-RoBERTa", pretrained_model=str(encoder),
                  load_pretrained_weights=False, local_files_only=True, hidden_sizes=[16],
                  sent_layer="mix", word_layer=1, dropout=0.1)
    torch.manual_seed(seed)
    if kind == "kiwi":
        model = UnifiedMetric(input_segments=["mt", "src"], layer_transformation="sparsemax",
                              **common)
        identifier = "unified_metric"
    elif kind == "xcomet":
        model = XCOMETMetric(layer_transformation="softmax", layer_norm=False, **common)
        identifier = "xcomet_metric"
    else:
        raise ValueError(f"kind must be kiwi or xcomet, not {kind!r}")
    # Spread the regression head so that scores differ visibly between segments.
    with torch.no_grad():
        for parameter in model.estimator.parameters():
            parameter.mul_(8.0)
    return save_comet_checkpoint(model, {**dict(model.hparams), "class_identifier": identifier},
                                 path)


def save_comet_checkpoint(model, hparams: dict, path):
    """`model` as COMET saves one: `checkpoints/model.ckpt` (a Lightning checkpoint holding the
    weights and `hparams`) and `hparams.yaml` beside it; returns the checkpoint's path."""
    from pathlib import Path

    import pytorch_lightning
    import torch
    import yaml

    path = Path(path)
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    checkpoint = path / "checkpoints" / "model.ckpt"
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": pytorch_lightning.__version__}, checkpoint)
    (path / "hparams.yaml").write_text(yaml.safe_dump(hparams))
    return checkpoint
