"""Log-probabilities of chosen tokens without the [tokens, vocabulary] logits of a whole batch.

The LM head over a 128K-256K vocabulary makes the largest tensors of a preference step: the
float32 logits of every position, their log-softmax, and in the backward pass their gradient.
Here the decoder runs as usual, and only the positions that carry a loss go through the head,
`chunk` positions at a time, each chunk's logits freed before the next is made:

- a head whose weights do not train (LoRA elsewhere, the usual case; tied embeddings of a
  frozen base too): each chunk's gradient with respect to its hidden states is taken in the
  forward pass already. A row's log-probability depends on its own hidden state only, so the
  gradient of the chunk's sum is every row's own gradient, and the backward pass scales those
  by the upstream gradient. The head runs once forward and once backward, as without chunks.
- a head that trains (full fine-tuning, LoRA on `lm_head`): the weights' gradient needs the
  upstream gradient of every row, so each chunk is recomputed in the backward pass
  (`torch.utils.checkpoint`): one more forward of the head, still one chunk at a time.

Pure PyTorch: the same on CPU and GPU, under autocast, with peft (the decoder and head are
the peft-wrapped modules, so adapters apply and `disable_adapter` works) and tied embeddings.
A model whose head does more than a linear map (logit soft-capping, a logit scale) or that
does not expose its decoder is not chunked (`chunkable`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

DEFAULT_CHUNK_TOKENS = 256
"""Positions per head chunk: with a 128256-token vocabulary a float32 chunk of logits is
131 MB (a frozen linear head needs no second one), small against a 1B model's step yet
large enough (256 x hidden x vocabulary) for the matrix product to run at full speed on a
GPU."""

# Config attributes of heads that are not a plain linear map over the hidden state.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")


def base_model(model: Any) -> Any:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def chunkable(model: Any) -> str | None:
    """None when the model's head can be run in chunks; else why not (said once by the
    caller, which then computes full logits)."""
    base = base_model(model)
    if not (hasattr(base, "get_decoder") and hasattr(base, "get_output_embeddings")):
        return f"{type(base).__name__} does not expose its decoder and head"
    if base.get_output_embeddings() is None:
        return f"{type(base).__name__} has no output head"
    config = getattr(base, "config", None)
    for name in _HEAD_EXTRAS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return f"{type(base).__name__}'s head applies {name}"
    return None


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden)
    # In at least float32, as the full-logits path (`losses.token_logps`).
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return -F.cross_entropy(wide, targets, reduction="none")


def _linear_chunk(head: torch.nn.Linear, rows: torch.Tensor,
                  targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain linear head's log-probabilities of `targets` and their gradient with respect to
    `rows`, with one [rows, vocabulary] buffer: the logits become the softmax in place, and
    d log p / d logits = onehot - softmax. The same arithmetic as log-softmax and its backward
    (under autocast the same dtypes: the product in the autocast dtype, the softmax in at
    least float32), without autograd's second and third copies."""
    logits = F.linear(rows, head.weight, head.bias)
    wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
    del logits  # a half-precision product's buffer, where `wide` is a float32 copy
    wide = wide.sub_(wide.amax(-1, keepdim=True))
    index = torch.arange(len(targets), device=wide.device)
    chosen = wide[index, targets]
    total = wide.exp_().sum(-1)
    logps = chosen - total.log()
    softmax = wide.div_(total.unsqueeze(-1))
    softmax[index, targets] -= 1  # softmax - onehot: minus the gradient of log p
    weight = head.weight
    dtype = torch.get_autocast_dtype(rows.device.type) if torch.is_autocast_enabled(
        rows.device.type) else torch.promote_types(rows.dtype, weight.dtype)
    grads = -(softmax.to(dtype) @ weight.to(dtype))
    return logps, grads.to(rows.dtype)


class _FrozenHeadLogps(torch.autograd.Function):
    """Chunked log-probabilities through a head that does not train; see the module's doc."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                chunk: int) -> torch.Tensor:
        logps, grads = [], []
        for start in range(0, hidden.shape[0], chunk):
            rows, wanted = hidden[start:start + chunk].detach(), targets[start:start + chunk]
            if type(head) is torch.nn.Linear:  # exactly: a subclass may do more
                values, grad = _linear_chunk(head, rows, wanted)
            else:  # a wrapped head (a frozen adapter): its own backward pass, per chunk
                with torch.enable_grad():
                    rows = rows.requires_grad_(True)
                    values = _chunk_logps(head, rows, wanted)
                    (grad,) = torch.autograd.grad(values.sum(), rows)
            logps.append(values.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(logps)

    @staticmethod
    def backward(ctx, upstream: torch.Tensor):
        (grads,) = ctx.saved_tensors
        return upstream.unsqueeze(-1).to(grads.dtype) * grads, None, None, None


def chunked_logps(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module,
                  chunk: int) -> torch.Tensor:
    """log p(target | hidden state) per row of `hidden` [N, H], `chunk` rows at a time."""
    if not hidden.shape[0]:
        return hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
    trains = torch.is_grad_enabled() and any(p.requires_grad for p in head.parameters())
    if trains:
        step = functools.partial(_chunk_logps, head)
        return torch.cat([checkpoint(step, hidden[start:start + chunk],
                                     targets[start:start + chunk], use_reentrant=False)
                          for start in range(0, hidden.shape[0], chunk)])
    if torch.is_grad_enabled() and hidden.requires_grad:
        return _FrozenHeadLogps.apply(hidden, targets, head, chunk)
    return torch.cat([_chunk_logps(head, hidden[start:start + chunk],
                                   targets[start:start + chunk])
                      for start in range(0, hidden.shape[0], chunk)])


def selected_token_logps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                         selected: torch.Tensor, chunk: int) -> torch.Tensor:
    """log p(input_ids[:, t + 1] | ...) at the positions t where `selected` [B, T - 1] is
    True, 0 elsewhere: `losses.token_logps`'s values, without full logits."""
    base = base_model(model)
    hidden = base.get_decoder()(input_ids=input_ids, attention_mask=attention_mask,
                                use_cache=False).last_hidden_state
    rows = hidden[:, :-1][selected]
    logps = chunked_logps(rows, input_ids[:, 1:][selected], base.get_output_embeddings(), chunk)
    return logps.new_zeros(selected.shape).masked_scatter(selected, logps)
