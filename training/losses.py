"""Preference losses as pure functions of per-sequence log-probabilities.

Every function takes, per pair in the batch, the summed log-probability of the chosen and the
rejected completion and their token counts, and returns the loss with the metrics trainers in
this ecosystem log under the same names (`rewards/chosen`, `logps/rejected`, ...).

- CPO (Xu et al. 2024): `L = L_prefer + cpo_alpha * L_NLL`, with no reference model. The
  preference term is `sigmoid` (optionally label-smoothed), `hinge`, `ipo` or `simpo`; sigmoid
  and hinge use summed log-probabilities, ipo and simpo per-token means. `L_NLL` is the
  token-mean cross-entropy over the batch's chosen completion tokens.
- ORPO (Hong et al. 2024): `L = L_NLL - lambda * log sigmoid(log odds(y_w) - log odds(y_l))` on
  per-token-mean log-probabilities; the caller passes the NLL (it may cover the prompt).
- DPO, for comparison runs, against a reference model's log-probabilities.

Under gradient accumulation a step's batch is split into micro-batches, and means over the
micro-batch would weigh a short micro-batch like a long one. So every loss takes optional
`pairs` and `nll_tokens`: the step's whole pair count and chosen-token count. The micro-batch
losses are then shares of the step's loss and add up to it exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


@dataclass
class LossOutput:
    loss: torch.Tensor
    """Scalar, differentiable."""
    metrics: dict[str, float]
    """Batch means, detached."""


def token_logps(logits: torch.Tensor, labels: torch.Tensor,
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each next token and the mask of those that count.

    `logits[b, t]` predicts token `t + 1`, so labels are shifted by one; positions labelled
    `ignore_index` (prompt and padding) get 0 and mask False.
    """
    # Shift the labels, not the logits: a sliced logits tensor is not contiguous, and
    # flattening it would copy the largest tensor of the step.
    targets = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)],
                        dim=1)
    # Fused log-softmax + gather in at least float32: bf16 log-probabilities of long
    # sequences lose whole nats, and the fused kernel keeps no second vocabulary-sized copy
    # for the gather. A float64 model (exactness checks) keeps float64.
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    logps = -F.cross_entropy(wide.flatten(0, 1), targets.flatten(),
                             ignore_index=ignore_index, reduction="none")
    # The last position predicts nothing; drop it (a view, no copy).
    return logps.view(targets.shape)[:, :-1], (targets != ignore_index)[:, :-1]


def completion_logps(logits: torch.Tensor, labels: torch.Tensor,
                     ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of each sequence's labelled tokens, and how many there are."""
    logps, mask = token_logps(logits, labels, ignore_index)
    return (logps * mask).sum(-1), mask.sum(-1)


def _metrics(loss: torch.Tensor, nll: torch.Tensor, chosen_rewards: torch.Tensor,
             rejected_rewards: torch.Tensor, chosen_logps: torch.Tensor,
             rejected_logps: torch.Tensor) -> dict[str, float]:
    return {
        "loss": loss.item(),
        "nll_loss": nll.item(),
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "logps/chosen": chosen_logps.mean().item(),
        "logps/rejected": rejected_logps.mean().item(),
    }


def chosen_nll(chosen_sum: torch.Tensor, chosen_count: torch.Tensor,
               nll_tokens: int | None = None) -> torch.Tensor:
    """Token-mean cross-entropy over all chosen completion tokens of the batch (or, with
    `nll_tokens`, this micro-batch's share of the step's token mean)."""
    denominator = chosen_count.sum().clamp(min=1) if nll_tokens is None else max(nll_tokens, 1)
    return -chosen_sum.sum() / denominator


def _pair_mean(values: torch.Tensor, pairs: int | None) -> torch.Tensor:
    return values.mean() if pairs is None else values.sum() / pairs


def cpo_loss(chosen_sum: torch.Tensor, rejected_sum: torch.Tensor, chosen_count: torch.Tensor,
             rejected_count: torch.Tensor, *, beta: float = 0.1, cpo_alpha: float = 1.0,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0,
             simpo_gamma: float = 0.5, pairs: int | None = None,
             nll_tokens: int | None = None, with_metrics: bool = True) -> LossOutput:
    """CPO: a preference term plus `cpo_alpha` times the NLL of the chosen completions."""
    if loss_type not in CPO_LOSS_TYPES:
        raise ValueError(f"loss_type {loss_type!r} is not one of {CPO_LOSS_TYPES}")
    if loss_type in ("ipo", "simpo"):
        chosen = chosen_sum / chosen_count.clamp(min=1)
        rejected = rejected_sum / rejected_count.clamp(min=1)
    else:
        chosen, rejected = chosen_sum, rejected_sum
    delta = chosen - rejected
    if loss_type == "sigmoid":
        prefer = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  - label_smoothing * F.logsigmoid(-beta * delta))
    elif loss_type == "hinge":
        prefer = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        prefer = (delta - 1 / (2 * beta)) ** 2
    else:  # simpo: a target margin gamma/beta inside the sigmoid
        prefer = -F.logsigmoid(beta * (delta - simpo_gamma / beta))
    nll = chosen_nll(chosen_sum, chosen_count, nll_tokens)
    loss = _pair_mean(prefer, pairs) + cpo_alpha * nll
    if not with_metrics:
        return LossOutput(loss, {})
    metrics = _metrics(loss, nll, (beta * chosen).detach(), (beta * rejected).detach(),
                       chosen.detach(), rejected.detach())
    return LossOutput(loss, metrics)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without the cancellation near 0 that gives ORPO its NaNs."""
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)),
                       torch.log1p(-torch.exp(x)))


def orpo_loss(chosen_sum: torch.Tensor, rejected_sum: torch.Tensor, chosen_count: torch.Tensor,
              rejected_count: torch.Tensor, nll: torch.Tensor, *,
              lam: float = 0.1, pairs: int | None = None,
              with_metrics: bool = True) -> LossOutput:
    """ORPO: `nll - lam * log sigmoid(log odds ratio)` on per-token-mean log-probabilities.

    `nll` comes from the caller, over the completion or over prompt and completion."""
    chosen = chosen_sum / chosen_count.clamp(min=1)
    rejected = rejected_sum / rejected_count.clamp(min=1)
    # A mean log-probability of exactly 0 would make log(1 - p) infinite: keep it just below.
    chosen_c = chosen.clamp(max=-1e-6)
    rejected_c = rejected.clamp(max=-1e-6)
    log_odds = (chosen_c - rejected_c) - (log1mexp(chosen_c) - log1mexp(rejected_c))
    ratio = F.logsigmoid(log_odds)
    loss = nll - lam * _pair_mean(ratio, pairs)
    if not with_metrics:
        return LossOutput(loss, {})
    metrics = _metrics(loss, nll, (lam * chosen).detach(), (lam * rejected).detach(),
                       chosen.detach(), rejected.detach())
    metrics["log_odds_ratio"] = ratio.mean().item()
    metrics["log_odds_chosen"] = log_odds.mean().item()
    return LossOutput(loss, metrics)


def dpo_loss(chosen_sum: torch.Tensor, rejected_sum: torch.Tensor,
             reference_chosen_sum: torch.Tensor, reference_rejected_sum: torch.Tensor,
             chosen_count: torch.Tensor, *, beta: float = 0.1, pairs: int | None = None,
             nll_tokens: int | None = None, with_metrics: bool = True) -> LossOutput:
    """DPO: `-log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))` on summed log-probs.

    The NLL of the chosen side is reported, not added."""
    chosen_rewards = beta * (chosen_sum - reference_chosen_sum)
    rejected_rewards = beta * (rejected_sum - reference_rejected_sum)
    loss = _pair_mean(-F.logsigmoid(chosen_rewards - rejected_rewards), pairs)
    if not with_metrics:
        return LossOutput(loss, {})
    nll = chosen_nll(chosen_sum, chosen_count, nll_tokens)
    return LossOutput(loss, _metrics(loss, nll, chosen_rewards.detach(),
                                     rejected_rewards.detach(), chosen_sum.detach(),
                                     rejected_sum.detach()))
