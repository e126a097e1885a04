"""COMET scoring in-process: CometKiwi, XCOMET (with error spans) and COMET-22.

Instead of `model.predict()`, which builds a Lightning Trainer and a DataLoader on every call,
the model is loaded once per process and each batch goes through the same two calls `predict()`
makes per batch, `prepare_for_inference` and `predict_step`, under `torch.inference_mode`. With
the same checkpoint and dtype the numbers are COMET's own (tested against `predict()`).

Batches are filled by token count up to a budget, longest first, and the caller's order is
restored. Segments longer than the encoder takes are cut by COMET itself; we count them.

`predict()` runs at float32 (its Lightning Trainer's default precision, on the float32 model
`load_from_checkpoint` returns), and so does a scorer by default. bfloat16/float16 are an
opt-in that moves the scores: a warning says so once per process and model when it loads,
and a checkpoint COMET itself cannot run in bfloat16 (COMET-22, whose average pooling
returns float32) is refused before it loads (`cpo_data.config_score.bfloat16_problem`).

Each distinct string is tokenized once per `score()` call: a source shared by seven candidates,
or a candidate that sampling produced twice, would otherwise be tokenized again for every row,
and once more to plan the batches. The encoder's own `prepare_sample` is served from that memo
(same tokenizer call, same truncation, same padding), so the model sees the same tensors.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from cpo_data.backends.torch_device import halving_on_oom, pick_device, pick_dtype
from cpo_data.batching import token_budget_batches
from cpo_data.config import ScorerConfig
from cpo_data.config_score import bfloat16_problem, comet_hparams
from cpo_data.fields import ConfigError
from cpo_data.identity import scorer_identity
from cpo_data.score import ScoreError, ScoreItem, ScoreResult

log = logging.getLogger(__name__)


def resolve_checkpoint(model: str) -> Path:
    """A local `.ckpt`, a COMET model folder, or a hub id (downloaded or from the HF cache)."""
    local = Path(model).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        checkpoint = local / "checkpoints" / "model.ckpt"
        if checkpoint.is_file():
            return checkpoint
        raise ScoreError(f"{model}: no checkpoints/model.ckpt in this folder")
    if model.startswith((".", "/", "~")) or model.endswith(".ckpt"):
        raise ScoreError(f"COMET checkpoint {model!r} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id=model)
    except GatedRepoError:
        raise ScoreError(
            f"{model} is gated on the Hugging Face hub: accept its licence on the model page, "
            "then set HF_TOKEN (or run `huggingface-cli login`) where the model is downloaded"
        ) from None
    except LocalEntryNotFoundError:
        raise ScoreError(
            f"cannot fetch {model}: it is not in the Hugging Face cache and the hub cannot be "
            "reached (this machine may be offline, or HF_HUB_OFFLINE is set); download it "
            "where there is a network and copy the cache, or pass a local checkpoint path"
        ) from None
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds; say which
        raise ScoreError(f"cannot fetch COMET model {model}: {type(error).__name__}: "
                         f"{error}") from None
    return Path(folder) / "checkpoints" / "model.ckpt"


def fetch_encoder(checkpoint: Path) -> None:
    """Put the encoder COMET rebuilds into the Hugging Face cache before COMET loads.

    COMET builds its encoder from the config and tokenizer of the repo its `hparams.yaml` names
    (`pretrained_model`, e.g. facebook/xlm-roberta-xxl), and we load it with
    `local_files_only`, so those files must be cached: fetched here (not the weights, which
    the COMET checkpoint holds), or, offline, named when they are missing."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    from cpo_data.preflight import ENCODER_FILES

    encoder = (comet_hparams(str(checkpoint)) or {}).get("pretrained_model")
    if not encoder or Path(str(encoder)).expanduser().is_dir():
        return
    try:
        snapshot_download(str(encoder), allow_patterns=ENCODER_FILES,
                          local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        raise ScoreError(
            f"{checkpoint}: COMET rebuilds its encoder from {encoder}, which is not in the "
            "Hugging Face cache, and HF_HUB_OFFLINE is set: run `cpo-data download CONFIG` "
            "where there is a network") from None
    except Exception as error:  # noqa: BLE001 - the hub raises many kinds; say which
        raise ScoreError(f"{checkpoint}: cannot fetch its encoder {encoder}: "
                         f"{type(error).__name__}: {error}") from None


# Token ids per string for the `score()` call running in this thread or task, if any.
_token_memo: contextvars.ContextVar[dict[str, list[int]] | None] = contextvars.ContextVar(
    "cpo_data_comet_token_memo", default=None)


def _memo_token_ids(encoder: Any, texts: Sequence[str], memo: dict[str, list[int]]) -> list:
    """Ids as `encoder.prepare_sample` makes them, tokenizing only strings not seen yet."""
    missing = list(dict.fromkeys(t for t in texts if t not in memo))
    if missing:
        ids = encoder.tokenizer(missing, truncation=True,
                                max_length=encoder.max_positions - 2)["input_ids"]
        memo.update(zip(missing, ids, strict=True))
    return [memo[t] for t in texts]


def _serve_from_memo(encoder: Any) -> None:
    """Route the encoder's plain (not word-level) tokenization through the active memo."""
    original = encoder.prepare_sample

    def prepare_sample(sample, word_level=False, annotations=None):
        memo = _token_memo.get()
        if memo is None or word_level:  # XCOMET's word-level path keeps COMET's own code
            return original(sample, word_level, annotations)
        return _pad(_memo_token_ids(encoder, sample, memo), encoder.tokenizer)

    encoder.prepare_sample = prepare_sample


def _pad(ids: list[list[int]], tokenizer: Any) -> dict[str, torch.Tensor]:
    """What `tokenizer(..., padding=True, return_tensors="pt")` returns for these ids.

    Written out because `tokenizer.pad` on lists of ints costs more than the forward pass of a
    small encoder (1.4 ms per batch, most of it converting to tensors)."""
    longest = max(len(row) for row in ids)
    left = tokenizer.padding_side == "left"
    pad_id = tokenizer.pad_token_id  # a slow property lookup in transformers: read it once
    padded, mask = [], []
    for row in ids:
        fill = longest - len(row)
        padded.append([pad_id] * fill + row if left else row + [pad_id] * fill)
        mask.append([0] * fill + [1] * len(row) if left else [1] * len(row) + [0] * fill)
    return {"input_ids": torch.tensor(padded, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long)}


@contextlib.contextmanager
def _active_memo() -> Iterator[dict[str, list[int]]]:
    memo: dict[str, list[int]] = {}
    token = _token_memo.set(memo)
    try:
        yield memo
    finally:
        _token_memo.reset(token)


_warned_precision: set[tuple[str, str]] = set()
"""(checkpoint, dtype) pairs whose half-precision warning this process has logged."""

PRECISION_WARNING = (
    "%s: %s runs in %s, so its scores differ from COMET's own predict(), which runs in "
    "float32 (on random-weight replicas by up to 0.034 in the CometKiwi-XXL shape and 0.111 "
    "in the XCOMET-XXL shape; see the README, Scoring, 'Precision'); dtype: float32 gives "
    "COMET's numbers")


def _check_precision(config: ScorerConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before anything loads, a checkpoint that COMET cannot run at `dtype`."""
    if dtype != torch.bfloat16:
        return
    problem = bfloat16_problem(comet_hparams(config.model, download=True))
    if problem:
        what = ("dtype: bfloat16" if config.dtype == "bfloat16"
                else f"dtype: {config.dtype}, which is bfloat16 on {device},")
        raise ConfigError(f"scorer {config.name!r}: {what} cannot run {config.model}: "
                          f"{problem}")


def _warn_precision(config: ScorerConfig, checkpoint: str, dtype: torch.dtype) -> None:
    """Once per process and model: half precision moves the scores off COMET's own."""
    name = str(dtype).removeprefix("torch.")
    if dtype in (torch.bfloat16, torch.float16) and (checkpoint, name) not in _warned_precision:
        _warned_precision.add((checkpoint, name))
        log.warning(PRECISION_WARNING, config.name, config.model, name)


@functools.lru_cache(maxsize=4)
def _load(checkpoint: str, device: str, dtype: str) -> Any:
    """One COMET model per process for the same checkpoint, device and dtype."""
    import comet

    torch_device = pick_device(device)
    model = comet.load_from_checkpoint(checkpoint, local_files_only=True)
    model.eval()
    model.to(torch_device, dtype=pick_dtype(dtype, torch_device))
    _serve_from_memo(model.encoder)
    return model


def _to_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_device(v, device) for v in value)
    return value


class CometScorer:
    """A `Scorer` over one COMET checkpoint."""

    def __init__(self, config: ScorerConfig):
        self.config = config
        self.name = config.name
        device = pick_device(config.device)
        dtype = pick_dtype(config.dtype, device)
        _check_precision(config, device, dtype)
        checkpoint = resolve_checkpoint(config.model)
        fetch_encoder(checkpoint)
        _warn_precision(config, str(checkpoint), dtype)
        self.model = _load(str(checkpoint), config.device, config.dtype)
        self.device = next(self.model.parameters()).device
        self.needs_reference = config.use_reference
        self.higher_is_better = True
        self.tokenizer = self.model.encoder.tokenizer
        self.max_tokens = self.model.encoder.max_positions
        self.identity = scorer_identity(config)  # as the build computes it, unloaded
        self.batches = 0
        """Forward batches run: a pool served from the cache leaves it unchanged."""
        self.oom_splits = 0
        self.last_truncated = 0

    def _lengths(self, items: Sequence[ScoreItem], memo: dict[str, list[int]]) -> list[int]:
        """Tokens per item once its segments are joined (each carries its 2 specials).

        Segments come already cut to the encoder's limit, so an item over `max_tokens` here
        is one COMET truncates: a cut segment alone fills all but 2 positions.
        """
        texts = [[i.mt, i.src] + ([i.ref] if self.needs_reference and i.ref else [])
                 for i in items]
        ids = iter(_memo_token_ids(self.model.encoder, [t for g in texts for t in g], memo))
        return [sum(len(next(ids)) for _ in group) for group in texts]

    def plan_batches(self, lengths: Sequence[int]) -> list[list[int]]:
        """Item indices per batch: longest first, rows x longest under the token budget."""
        return token_budget_batches(lengths, lambda longest: min(longest, self.max_tokens),
                                    self.config.token_budget, self.config.max_batch_size)

    def _samples(self, items: Sequence[ScoreItem]) -> list[dict[str, str]]:
        samples = []
        for item in items:
            sample = {"src": item.src, "mt": item.mt}
            if self.needs_reference:
                sample["ref"] = item.ref or ""
            samples.append(sample)
        return samples

    @torch.inference_mode()
    def _score_batch(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        inputs = _to_device(self.model.prepare_for_inference(self._samples(items)), self.device)
        prediction = self.model.predict_step(inputs)
        self.batches += 1
        scores = prediction["scores"].double().tolist()  # exact for every dtype, float64 too
        spans = None
        if "metadata" in prediction and "error_spans" in prediction["metadata"]:
            spans = prediction["metadata"]["error_spans"]
        return [ScoreResult(s, spans[i] if spans is not None else None)
                for i, s in enumerate(scores)]

    def score(self, items: Sequence[ScoreItem]) -> list[ScoreResult]:
        if self.needs_reference and any(i.ref is None for i in items):
            raise ScoreError(f"{self.name}: use_reference is set but an item has no reference")
        with _active_memo() as memo:
            return self._score_all(items, self._lengths(items, memo))

    def _score_all(self, items: Sequence[ScoreItem], lengths: list[int]) -> list[ScoreResult]:
        from tqdm.auto import tqdm

        self.last_truncated = sum(n > self.max_tokens for n in lengths)
        if self.last_truncated:
            log.warning("%s: %d of %d segments exceed the encoder's %d tokens; COMET "
                        "truncates them", self.name, self.last_truncated, len(items),
                        self.max_tokens)
        results: list[ScoreResult | None] = [None] * len(items)
        progress = tqdm(total=len(items), desc=f"score {self.name}", unit="seg", disable=None)
        for batch in self.plan_batches(lengths):
            scored, splits = halving_on_oom(self._score_batch, [items[i] for i in batch],
                                            self.name)
            self.oom_splits += splits
            for i, result in zip(batch, scored, strict=True):
                results[i] = result
            progress.update(len(batch))
        progress.close()
        return results  # type: ignore[return-value]


def load_scorer(config: ScorerConfig):
    """The scorer for one configured entry: COMET or sacrebleu."""
    if config.kind == "comet":
        return CometScorer(config)
    from cpo_data.backends.sacrebleu_score import SacrebleuScorer

    return SacrebleuScorer(config)
