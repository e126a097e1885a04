"""One forward pass of chosen and rejected together, and the configured loss on its output.

Shared by the training loop and the held-out evaluation, so both measure the same thing.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, fields

import torch

from training.chunked import chunkable, selected_token_logps
from training.config import TrainConfig
from training.data import IGNORE
from training.losses import LossOutput, chosen_nll, cpo_loss, dpo_loss, orpo_loss, token_logps
from training.packing import pack, packable, packed_logps

log = logging.getLogger("cpo_data.training")


@dataclass
class Logps:
    """Per pair: summed completion log-probabilities, token counts, and the NLL's terms."""

    chosen_sum: torch.Tensor
    rejected_sum: torch.Tensor
    chosen_count: torch.Tensor
    rejected_count: torch.Tensor
    nll_sum: torch.Tensor
    """Summed log-probability the NLL term covers: the chosen completion, or for ORPO with
    `orpo_nll_on_prompt` the whole chosen sequence."""
    nll_count: torch.Tensor

    def detach(self) -> Logps:
        return Logps(*(getattr(self, f.name).detach() for f in fields(self)))

    @staticmethod
    def cat(parts: list[Logps]) -> Logps:
        return Logps(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(Logps)))

    @staticmethod
    def columns() -> tuple[str, ...]:
        return tuple(f.name for f in fields(Logps))


def nll_covers_prompt(config: TrainConfig) -> bool:
    return config.loss == "orpo" and config.orpo_nll_on_prompt


def accepts_logits_to_keep(model) -> bool:
    """Whether the model can skip the LM head on positions that carry no loss."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def head_chunk(model, config: TrainConfig) -> int | None:
    """Positions per LM-head chunk for this model (`train.logps_chunk_tokens`), or None for
    full logits: when the setting is null, or the model's head cannot be chunked (a warning)."""
    if config.logps_chunk_tokens is None:
        return None
    why = chunkable(model)
    if why is not None:
        log.warning("computing full logits: %s (logps_chunk_tokens needs a plain linear head)",
                    why)
        return None
    return config.logps_chunk_tokens


_said: set[str] = set()


def _say_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        log.warning(message)


def prompt_once(model, config: TrainConfig) -> bool:
    """Whether pairs run packed, the prompt once (`train.prompt_once`); where the model
    cannot, the two-sequence path, said once."""
    if not config.prompt_once:
        return False
    why = packable(model)
    if why is not None:
        _say_once(f"prompt_once: running chosen and rejected as two sequences: {why}")
        return False
    return True


def nll_tokens(batch: dict[str, torch.Tensor], full_sequence: bool) -> int:
    """Tokens the NLL term averages over in this batch (chosen rows are the first half)."""
    pairs = batch["input_ids"].shape[0] // 2
    if full_sequence:
        return int(batch["attention_mask"][:pairs, 1:].sum())
    return int((batch["labels"][:pairs, 1:] != IGNORE).sum())


def forward_logps(model, batch: dict[str, torch.Tensor], full_sequence_nll: bool,
                  trim_logits: bool, chunk: int | None = None,
                  prompt_once: bool = False) -> Logps:
    """Log-probabilities of a collated batch (chosen rows first, then rejected). `chunk`:
    positions per LM-head chunk (`training.chunked`), None for full logits; `prompt_once`:
    each pair as one packed sequence (`training.packing`; the caller checked `packable`)."""
    labels = batch["labels"]
    pairs = labels.shape[0] // 2
    if prompt_once:
        packed = pack(batch, full_sequence_nll)
        if packed is not None:
            (chosen, chosen_n), (rejected, rejected_n), nll = packed_logps(model, packed, pairs,
                                                                           chunk)
            nll_sum, nll_count = nll if full_sequence_nll else (chosen, chosen_n)
            return Logps(chosen, rejected, chosen_n, rejected_n, nll_sum, nll_count)
        _say_once("a pair's chosen and rejected sequences do not share their prompt: such "
                  "batches run as two sequences")
    if chunk is not None:
        return _chunked_forward_logps(model, batch, full_sequence_nll, chunk)
    extra = {}
    if trim_logits and not full_sequence_nll:
        # The LM head over the vocabulary is the largest matrix product of a translation
        # model's forward pass; prompt positions need none of it. Keep logits from the
        # position that predicts the earliest completion token onwards.
        first_label = int((labels != IGNORE).float().argmax(-1).min())
        keep = labels.shape[1] - max(first_label - 1, 0)
        extra["logits_to_keep"] = keep
        labels = labels[:, labels.shape[1] - keep:]
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   use_cache=False, **extra).logits
    if full_sequence_nll:
        targets = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)
        logps, token_mask = token_logps(logits, targets)
        completion = labels[:, 1:] != IGNORE
        sums, counts = (logps * completion).sum(-1), completion.sum(-1)
        nll_sum = (logps * token_mask)[:pairs].sum(-1)
        nll_count = token_mask[:pairs].sum(-1)
    else:
        logps, completion = token_logps(logits, labels)
        sums, counts = (logps * completion).sum(-1), completion.sum(-1)
        nll_sum, nll_count = sums[:pairs], counts[:pairs]
    return Logps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:], nll_sum, nll_count)


def _chunked_forward_logps(model, batch: dict[str, torch.Tensor], full_sequence_nll: bool,
                           chunk: int) -> Logps:
    """`forward_logps` with the head run only where a term needs it, in chunks."""
    labels, attention = batch["labels"], batch["attention_mask"]
    pairs = labels.shape[0] // 2
    completion = labels[:, 1:] != IGNORE
    selected = completion
    if full_sequence_nll:
        # Position t counts when token t + 1 is real; the chosen rows' NLL covers them all.
        token_mask = attention[:, 1:].bool()
        selected = completion.clone()
        selected[:pairs] |= token_mask[:pairs]
    logps = selected_token_logps(model, batch["input_ids"], attention, selected, chunk)
    sums, counts = (logps * completion).sum(-1), completion.sum(-1)
    if full_sequence_nll:
        nll_sum = (logps * token_mask)[:pairs].sum(-1)
        nll_count = token_mask[:pairs].sum(-1)
    else:
        nll_sum, nll_count = sums[:pairs], counts[:pairs]
    return Logps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:], nll_sum, nll_count)


def preference_loss(config: TrainConfig, logps: Logps, reference: Logps | None = None,
                    pairs: int | None = None, nll_token_count: int | None = None,
                    with_metrics: bool = True) -> LossOutput:
    """The configured loss; with `pairs` and `nll_token_count` (the optimizer step's totals) it
    is this micro-batch's share of the step's loss."""
    if config.loss == "cpo":
        return cpo_loss(logps.chosen_sum, logps.rejected_sum, logps.chosen_count,
                        logps.rejected_count, beta=config.beta, cpo_alpha=config.cpo_alpha,
                        loss_type=config.loss_type, label_smoothing=config.label_smoothing,
                        simpo_gamma=config.simpo_gamma, pairs=pairs,
                        nll_tokens=nll_token_count, with_metrics=with_metrics)
    if config.loss == "orpo":
        nll = chosen_nll(logps.nll_sum, logps.nll_count, nll_token_count)
        return orpo_loss(logps.chosen_sum, logps.rejected_sum, logps.chosen_count,
                         logps.rejected_count, nll, lam=config.orpo_lambda, pairs=pairs,
                         with_metrics=with_metrics)
    assert reference is not None, "dpo needs the reference log-probabilities"
    return dpo_loss(logps.chosen_sum, logps.rejected_sum, reference.chosen_sum,
                    reference.rejected_sum, logps.chosen_count, beta=config.beta, pairs=pairs,
                    nll_tokens=nll_token_count, with_metrics=with_metrics)


def reference_logps(model, batch: dict[str, torch.Tensor], trim_logits: bool,
                    chunk: int | None = None, prompt_once: bool = False) -> Logps:
    """DPO's reference: the same weights with the LoRA adapter switched off, so no second
    copy of the model is held."""
    with torch.no_grad(), model.disable_adapter():
        return forward_logps(model, batch, False, trim_logits, chunk, prompt_once)
