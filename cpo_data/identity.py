"""What decides a backend's outputs, from its config and its model's files, without loading it.

One identity per generator and per scorer. The content caches key on it (a namespace per
identity), and so do the build's shard keys, so the two never disagree about what a change
invalidates. It holds the config fields that change outputs and the weights' fingerprint (a
folder's content, or a hub repo's commit); fields that change no output (the system name, batch
size, token budget, device, worker count) are in neither. Computing it reads a few small JSON
files at most, so a rebuild whose work is all cached loads no model.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

from cpo_data.config import GeneratorConfig, ScorerConfig
from cpo_data.config_endpoint import EndpointConfig
from cpo_data.fingerprint import (
    adapter_weights,
    hub_file,
    scorer_weights,
    weights_fingerprint,
)


def _is_folder(path: str | None) -> bool:
    return bool(path) and Path(path).expanduser().is_dir()


def model_json(model: str, revision: str | None, filename: str) -> dict | None:
    """A small JSON file of a model folder or hub repo (None when the model has none); for a
    hub repo from the Hugging Face cache, else downloaded (`fingerprint.hub_file`)."""
    if _is_folder(model):
        path: Path | None = Path(model).expanduser() / filename
        if not path.is_file():
            path = None
    else:
        path = hub_file(model, revision, filename)
    return json.loads(path.read_text(encoding="utf-8")) if path is not None else None


def is_seq2seq(config: GeneratorConfig) -> bool:
    """Whether the generator runs as an encoder-decoder (Marian, NLLB, M2M100)."""
    if config.kind != "auto":
        return config.kind == "seq2seq"
    model_config = model_json(config.model, config.revision, "config.json") or {}
    return bool(model_config.get("is_encoder_decoder"))


def language_token_scheme(config: GeneratorConfig) -> str | None:
    """A seq2seq model's language-token scheme: nllb (deu_Latn), m2m (__de__) or None
    (Marian), as configured or, for auto, from the tokenizer class the model ships."""
    if config.language_tokens != "auto":
        return None if config.language_tokens == "none" else config.language_tokens
    tokenizer = model_json(config.model, config.revision, "tokenizer_config.json") or {}
    name = tokenizer.get("tokenizer_class") or ""
    return scheme_of_tokenizer_class(name)


def scheme_of_tokenizer_class(name: str) -> str | None:
    """nllb, m2m or None for a tokenizer class name (NllbTokenizerFast, M2M100Tokenizer, ...)."""
    if name.startswith("Nllb"):
        return "nllb"
    if name.startswith("M2M100"):
        return "m2m"
    return None


def decoding(config: GeneratorConfig) -> dict[str, Any]:
    """The decoding settings that apply to the configured strategy."""
    settings: dict[str, Any] = {"strategy": config.strategy,
                                "num_candidates": config.num_candidates,
                                "max_new_tokens": config.max_new_tokens}
    if config.strategy == "beam":
        settings["num_beams"] = config.num_beams
    if config.strategy == "sample":
        settings.update(temperature=config.temperature, top_p=config.top_p, seed=config.seed)
    return settings


def resolved_dtype(dtype: str, device: str) -> str:
    """The dtype a model will run in, as torch names it (`torch.bfloat16`). A named dtype
    needs no device; `auto` depends on the device, resolved here where it can be: this
    process (a CPU-only flow host of GPU workers) may not see the device, and then the key
    says which device's default it stands for."""
    if dtype != "auto":
        return f"torch.{dtype}"
    from cpo_data.backends.torch_device import DeviceError, pick_device, pick_dtype

    try:
        return str(pick_dtype(dtype, pick_device(device)))
    except DeviceError:
        return f"auto@{device}"


def generator_identity(config: GeneratorConfig) -> dict[str, Any]:
    """What decides a generator's outputs."""
    seq2seq = is_seq2seq(config)
    adapter = config.adapter
    return {
        "kind": "seq2seq" if seq2seq else "causal",
        # A folder is known by its content, so moving it keeps the cache; a hub id by name.
        "model": None if _is_folder(config.model) else config.model,
        "weights": weights_fingerprint(config.model, config.revision),
        "adapter": None if _is_folder(adapter) else adapter,
        "adapter_weights": adapter_weights(adapter) if adapter else None,
        "dtype": resolved_dtype(config.dtype, config.device),
        "prompt": None if seq2seq else config.prompt_template,
        # The template's text comes with the model's files, which the fingerprint covers.
        "chat_template": (not seq2seq) and config.use_chat_template,
        "language_tokens": language_token_scheme(config) if seq2seq else None,
        "max_source_tokens": config.max_source_tokens,
        "decoding": decoding(config),
    }


def endpoint_decoding(config: EndpointConfig) -> dict[str, Any]:
    """The sampling settings a served model's requests carry."""
    return {"n": config.n, "temperature": config.temperature, "top_p": config.top_p,
            "max_tokens": config.max_tokens, "seed": config.seed}


def endpoint_identity(config: EndpointConfig) -> dict[str, Any]:
    """What decides a served model's outputs: the model name, the decoding and the prompt.
    Not the URL (the same model may move between servers) and never the key."""
    return {
        "kind": config.kind,
        "model": config.model,
        "system_prompt": config.system_prompt or None,
        "prompt": config.user_prompt,
        "decoding": endpoint_decoding(config),
    }


def scorer_identity(config: ScorerConfig) -> dict[str, Any]:
    """What decides a scorer's numbers."""
    if config.kind == "comet":
        return {"kind": "comet", "weights": scorer_weights(config),
                "dtype": resolved_dtype(config.dtype, config.device),
                "use_reference": config.use_reference}
    # sacrebleu's own signature exists only after a corpus score; these are its parts.
    return {"kind": config.kind, "sacrebleu": importlib.metadata.version("sacrebleu"),
            "tokenize": config.bleu_tokenize if config.kind == "bleu" else None}
