"""Tiny replicas of configs/alma-r.yaml's models, in their real classes and hub layouts.

Each mimics one real repo: the same model class, file names and formats (sharded `.bin`
weights, a sentencepiece `tokenizer.model`, a peft adapter, COMET's `hparams.yaml` +
`checkpoints/model.ckpt` naming its encoder by hub id), with every dimension cut down and
random weights. `fake_hub_snapshot` then lays a saved folder out in the Hugging Face cache as
`snapshot_download` leaves it, so the recipe's own hub ids resolve to the replicas offline.
"""

from __future__ import annotations

from cpo_data.testing import save_comet_checkpoint, training_texts, xlmr_tokenizer

ALMA_BASE = "haoranxu/ALMA-13B-Pretrain"
ALMA_LORA = "haoranxu/ALMA-13B-Pretrain-LoRA"
KIWI_XXL = "Unbabel/wmt23-cometkiwi-da-xxl"
XCOMET_XXL = "Unbabel/XCOMET-XXL"
COMET_22 = "Unbabel/wmt22-comet-da"
XLMR_XXL = "facebook/xlm-roberta-xxl"
"""The encoder both XXL COMET models name as `pretrained_model` in their hparams.yaml."""
XLMR_LARGE = "xlm-roberta-large"
"""The encoder COMET-22 names (a legacy hub id without an organisation)."""


def _llama2_tokenizer(folder, vocab_size: int = 800):
    """Llama-2's tokenizer layout, trained here: a byte-fallback BPE sentencepiece model
    (`tokenizer.model`; <unk> 0, <s> 1, </s> 2, no pad token, digits split, whitespace kept as
    is) loaded as the slow `LlamaTokenizer` and saved by it: `tokenizer.model`,
    `tokenizer_config.json`, `special_tokens_map.json` and no `tokenizer.json`, so that
    `AutoTokenizer` converts the sentencepiece model to `LlamaTokenizerFast` on load, as for a
    repo that ships only the sentencepiece file."""
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(training_texts()), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", character_coverage=1.0, byte_fallback=True, split_digits=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, minloglevel=2,
    )
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = LlamaTokenizer(vocab_file=str(folder / "tokenizer.model"), legacy=False)
    tokenizer.save_pretrained(folder)
    return tokenizer


def build_tiny_llama2(path, seed: int = 0, hidden_size: int = 32, layers: int = 2,
                      max_shard_size: str = "50KB", dtype: str = "float16"):
    """A replica of `haoranxu/ALMA-13B-Pretrain` (Llama-2-13B after ALMA's monolingual stage).

    The same class (`LlamaForCausalLM`), the same files: `config.json`, `generation_config.json`,
    weights as sharded pickled `.bin` files with `pytorch_model.bin.index.json` (shards of GBs
    in the real repo; the default `max_shard_size` here gives 3 of ~50 kB), stored in float16
    as the real ones are, and a sentencepiece `tokenizer.model` (Llama-2's byte-fallback BPE,
    no pad token). Smaller: 32 hidden units instead of 5120, 2 layers instead of 40, 4 heads
    instead of 40 (still no grouped-query attention, as 13B has none), an 800-piece
    vocabulary instead of 32000, trained on `training_texts()`; random weights.
    """
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = _llama2_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size,
        intermediate_size=hidden_size * 27 // 10,  # 13824 / 5120, as Llama-2-13B
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
        max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=False,
        torch_dtype=dtype,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger random weights: outputs then depend on the source
        model.lm_head.weight.mul_(20.0)
    model.to(getattr(torch, dtype))
    model.save_pretrained(path, safe_serialization=False, max_shard_size=max_shard_size)
    return path


def build_tiny_lora_adapter(base_path, path, seed: int = 0, base_model_name: str | None = None,
                            rank: int = 16, alpha: int = 32,
                            target_modules: tuple[str, ...] = ("down_proj",)):
    """A replica of `haoranxu/ALMA-13B-Pretrain-LoRA` (ALMA-13B-LoRA's adapter) for the model
    at `base_path` (see `build_tiny_llama2`).

    As the real one: a peft LoRA adapter of rank 16, alpha 32, on `down_proj` only, saved with
    `save_pretrained` as pickled `adapter_model.bin` and `adapter_config.json`, the config cut
    down to the fields peft 0.5 wrote (the real repo was written by peft 0.5, before
    safetensors). Its B matrices are random rather than zero, as a trained adapter's are, so
    merging it changes what the model generates. Smaller: only in the base's dimensions.
    `base_model_name` goes into the config's `base_model_name_or_path` (the real one names
    the base's hub id); default `base_path`.
    """
    import json
    from pathlib import Path

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    lora = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.05, bias="none",
                      target_modules=list(target_modules), task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=False)
    # The config as peft 0.5 wrote it: only the fields it knew. The base is named after
    # saving: peft's save looks it up by this name (for a changed vocabulary), which for a hub
    # id not cached yet would only warn.
    saved = json.loads((path / "adapter_config.json").read_text())
    config = {key: saved.get(key) for key in _PEFT_05_LORA_FIELDS}
    config["base_model_name_or_path"] = base_model_name or str(base_path)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return path


# The fields of a LoRA adapter_config.json written by peft 0.5 (rank_pattern, use_dora, ...
# came later): what the real ALMA-13B-Pretrain-LoRA's config holds.
_PEFT_05_LORA_FIELDS = (
    "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layers_pattern", "layers_to_transform", "lora_alpha", "lora_dropout",
    "modules_to_save", "peft_type", "r", "revision", "target_modules", "task_type")


def build_tiny_xlmr_xl_encoder(folder, hidden_size: int = 32, layers: int = 4,
                               max_tokens: int = 512):
    """A replica of `facebook/xlm-roberta-xxl` as COMET reads it: `config.json` of model type
    `xlm-roberta-xl` (`XLMRobertaXLConfig`, the pre-layer-norm XLM-R that COMET's encoder
    "XLM-RoBERTa-XL" builds) and XLM-R's sentencepiece tokenizer. No weights: COMET takes them
    from its own checkpoint, and `cpo-data download` fetches only the config and tokenizer of
    an encoder repo. Smaller: 32 hidden units instead of 4096, 4 layers instead of 48, 4 heads
    instead of 32, a 501-token vocabulary instead of 250880; positions as the real (512 tokens).
    """
    from pathlib import Path

    from transformers import XLMRobertaXLConfig

    folder = Path(folder)
    tokenizer = xlmr_tokenizer(folder)
    config = XLMRobertaXLConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=hidden_size * 4,  # 16384 / 4096
        max_position_embeddings=max_tokens + 2, layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, architectures=["XLMRobertaXLForMaskedLM"],
    )
    config.save_pretrained(folder)
    return folder


def build_tiny_xlmr_large_encoder(folder, hidden_size: int = 32, layers: int = 3,
                                  max_tokens: int = 512):
    """A replica of `xlm-roberta-large` as COMET-22 reads it (config and tokenizer, model
    type `xlm-roberta`). Smaller: 32 hidden units instead of 1024, 3 layers instead of 24."""
    from pathlib import Path

    from transformers import XLMRobertaConfig

    folder = Path(folder)
    tokenizer = xlmr_tokenizer(folder)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=hidden_size * 4,
        max_position_embeddings=max_tokens + 2, layer_norm_eps=1e-5,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, architectures=["XLMRobertaForMaskedLM"],
    )
    config.save_pretrained(folder)
    return folder


# What the real checkpoints' hparams.yaml say, for the settings that shape a score (the sizes
# are cut down in the replicas: hidden_sizes, word_layer). The XXL models take the CLS token
# of a layer mix without layer norm; their `sparsemax_patch` makes COMET >= 2.2.4 load the mix
# with softmax (comet.models.load_from_checkpoint, COMET issue #244).
REAL_COMET_HPARAMS = {
    "cometkiwi-xxl": {
        "class_identifier": "unified_metric", "encoder_model": "XLM-RoBERTa-XL",
        "pretrained_model": XLMR_XXL, "sent_layer": "mix",
        "layer_transformation": "sparsemax_patch", "layer_norm": False,
        "input_segments": ["mt", "src"], "word_level_training": False,
        "activations": "Tanh", "final_activation": None,
    },
    "xcomet-xxl": {
        "class_identifier": "xcomet_metric", "encoder_model": "XLM-RoBERTa-XL",
        "pretrained_model": XLMR_XXL, "sent_layer": "mix",
        "layer_transformation": "sparsemax_patch", "layer_norm": False,
        "word_level_training": True, "error_labels": ["minor", "major", "critical"],
        "activations": "Tanh", "final_activation": None,
    },
    "comet-22": {
        "class_identifier": "regression_metric", "encoder_model": "XLM-RoBERTa",
        "pretrained_model": XLMR_LARGE, "layer": "mix", "pool": "avg",
        "layer_transformation": "sparsemax", "layer_norm": True,
        "activations": "Tanh", "final_activation": None,
    },
}


def build_tiny_comet_replica(path, kind: str, encoder, encoder_id: str | None = None,
                             seed: int = 0):
    """A COMET model folder as the hub repo holds it (`hparams.yaml`,
    `checkpoints/model.ckpt`) over the tiny encoder at `encoder`, named in the checkpoint by
    its hub id `encoder_id` as the real ones are (default: the real encoder's id), so that
    loading resolves the encoder through the Hugging Face cache like the real models do.

    kind "cometkiwi-xxl": `Unbabel/wmt23-cometkiwi-da-xxl`, a `UnifiedMetric` reading
    [mt, src] (reference-free) on `facebook/xlm-roberta-xxl` (`build_tiny_xlmr_xl_encoder`).
    kind "xcomet-xxl": `Unbabel/XCOMET-XXL`, an `XCOMETMetric` (sentence score plus error
    spans from the word-level tags; run with or without a reference) on the same encoder.
    kind "comet-22": `Unbabel/wmt22-comet-da`, a `RegressionMetric` reading src, mt and ref
    (average pooling of a layer-normed mix) on `xlm-roberta-large`
    (`build_tiny_xlmr_large_encoder`).
    The settings in REAL_COMET_HPARAMS are the real ones; smaller: the estimator's hidden
    sizes (tens instead of thousands), the word layer (the encoder's last but one, where the
    XXL models use 36 of 48); random weights, the estimator's and the word tagger's scaled up
    and the layer mix's weights drawn at random, so that scores, spans and the mix's
    transformation all matter. Returns the path of `checkpoints/model.ckpt`.
    """
    import json
    from pathlib import Path

    import torch
    from comet.models import RegressionMetric, UnifiedMetric, XCOMETMetric

    real = REAL_COMET_HPARAMS[kind]
    path, encoder = Path(path), Path(encoder)
    layers = json.loads((encoder / "config.json").read_text())["num_hidden_layers"]
    common = dict(encoder_model=real["encoder_model"], pretrained_model=str(encoder),
                  load_pretrained_weights=False, local_files_only=True, dropout=0.1,
                  layer_transformation=real["layer_transformation"],
                  layer_norm=real["layer_norm"], activations=real["activations"],
                  final_activation=real["final_activation"])
    torch.manual_seed(seed)
    if kind == "cometkiwi-xxl":
        model = UnifiedMetric(input_segments=real["input_segments"], sent_layer="mix",
                              word_layer=layers - 1, hidden_sizes=[24, 8],
                              word_level_training=False, **common)
    elif kind == "xcomet-xxl":
        model = XCOMETMetric(sent_layer="mix", word_layer=layers - 1, hidden_sizes=[20, 10],
                             **common)
    elif kind == "comet-22":
        model = RegressionMetric(layer="mix", pool="avg", hidden_sizes=[24, 8], **common)
    else:
        raise ValueError(f"kind must be one of {sorted(REAL_COMET_HPARAMS)}, not {kind!r}")
    with torch.no_grad():  # scores spread around 0.5, as trained models' do around theirs
        first, last = model.estimator.ff[0], model.estimator.ff[-1]
        first.weight.mul_(32.0)
        last.bias.fill_(0.5)
        if model.layerwise_attention is not None:
            for parameter in model.layerwise_attention.scalar_parameters:
                parameter.normal_(0.0, 2.0)
        if kind == "xcomet-xxl":
            model.hidden2tag.weight.mul_(20.0)
    hparams = {**dict(model.hparams), "class_identifier": real["class_identifier"],
               "pretrained_model": encoder_id or real["pretrained_model"],
               # As the released checkpoints say; COMET's loader overrides both.
               "load_pretrained_weights": True, "local_files_only": False}
    return save_comet_checkpoint(model, hparams, path)


def fake_hub_snapshot(cache_root, repo_id: str, folder, commit: str | None = None):
    """Lay the files of `folder` out in a Hugging Face cache at `cache_root` (HF_HUB_CACHE)
    exactly as `huggingface_hub.snapshot_download` leaves a model repo:

        models--{org}--{name}/refs/main                 the commit, no newline
        models--{org}--{name}/blobs/{sha256}            each file's content, once
        models--{org}--{name}/snapshots/{commit}/{file} -> ../../blobs/{sha256} (relative link)

    `commit` defaults to a 40-hex digest of the folder's file names and contents (stable for
    the same files). Blobs are named by the sha256 of their content, as the hub names LFS
    files. Returns the snapshot folder (what `snapshot_download` returns)."""
    import hashlib
    import os
    import shutil
    from pathlib import Path

    folder, cache_root = Path(folder), Path(cache_root)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if commit is None:
        digest = hashlib.sha1()
        for file in files:
            digest.update(f"{file.relative_to(folder).as_posix()}\0".encode())
            digest.update(hashlib.sha256(file.read_bytes()).digest())
        commit = digest.hexdigest()
    repo = cache_root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for file in files:
        sha = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo / "blobs" / sha
        if not blob.exists():
            shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs" / "main").write_text(commit)
    return snapshot
