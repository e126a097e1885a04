"""The prompt once per pair: prompt, chosen and rejected packed into one sequence.

Chosen and rejected share their prompt (tokenizing cuts it once for both), and in MT the
prompt is about half of every sequence, so the two-sequence batch computes it twice. Packed,
row i of the batch is

    prompt_i + chosen_i + rejected_i            positions 0..P-1, P..P+C-1, P..P+R-1

with a 4-D attention mask under which a prompt token sees the prompt before it, a chosen token
the prompt and the chosen tokens before it, a rejected token the prompt and the rejected tokens
before it (never chosen), and position ids that restart the rejected completion after the
prompt. Every token then sees exactly what it sees in its own sequence, at the same position,
so its hidden state is the same, and the prompt's hidden states take gradients from both
completions, as the two copies' gradients add up in the two-sequence batch. The first rejected
token is predicted from the prompt's last position, the others from the token before them.

Only the positions a loss term needs go through the LM head (`training.chunked`). Padding
positions attend to themselves alone, so no row of the mask is empty (an empty row would make
NaN attention weights, and NaN times a zero gradient is still NaN).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from training.chunked import base_model, chunkable, chunked_logps
from training.data import IGNORE

# Attention implementations that take a custom 4-D mask as it is given (transformers passes
# a 4-D mask through untouched): SDPA as a boolean mask, eager as an additive one.
MASK_KINDS = {"sdpa": "bool", "eager": "additive"}


def packable(model: Any) -> str | None:
    """None when the model can run packed pairs; else why not."""
    why = chunkable(model)
    if why is not None:
        return why
    base = base_model(model)
    implementation = getattr(base.config, "_attn_implementation", None)
    if implementation not in MASK_KINDS:
        return (f"{type(base).__name__} runs {implementation} attention, which takes no "
                "custom 4-D mask (sdpa and eager do)")
    return None


@dataclass
class Packed:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    allowed: torch.Tensor
    """[pairs, 1, T, T] bool: query position may attend key position."""
    rows: torch.Tensor
    """Per scored token: its row, the position whose hidden state predicts it, its position."""
    predicted_from: torch.Tensor
    target_at: torch.Tensor
    kinds: torch.Tensor
    """Per scored token: CHOSEN, REJECTED or PROMPT (only for a full-sequence NLL)."""


CHOSEN, REJECTED, PROMPT = 0, 1, 2


def pack(batch: dict[str, torch.Tensor], full_sequence_nll: bool) -> Packed | None:
    """The pairs of a collated batch (chosen rows first), packed; None when some pair's two
    sequences do not share their prompt (then the batch runs as two sequences)."""
    ids, attention, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pairs = ids.shape[0] // 2
    lengths = attention.sum(-1).tolist()
    starts = (labels != IGNORE).float().argmax(-1).tolist()  # first completion token
    layout = []
    for i in range(pairs):
        prompt, chosen_end, rejected_end = starts[i], lengths[i], lengths[pairs + i]
        if starts[pairs + i] != prompt or not torch.equal(ids[i, :prompt],
                                                          ids[pairs + i, :prompt]):
            return None
        layout.append((prompt, chosen_end, rejected_end))
    longest = max(c + r - p for p, c, r in layout)
    device = ids.device
    packed_ids = ids.new_zeros((pairs, longest))  # padding: any id; no position reads it
    positions = torch.zeros((pairs, longest), dtype=torch.long, device=device)
    allowed = torch.zeros((pairs, 1, longest, longest), dtype=torch.bool, device=device)
    rows, sources, targets, kinds = [], [], [], []
    causal = torch.ones((longest, longest), dtype=torch.bool, device=device).tril()
    for i, (prompt, chosen_end, rejected_end) in enumerate(layout):
        rejected = rejected_end - prompt
        end = chosen_end + rejected
        packed_ids[i, :chosen_end] = ids[i, :chosen_end]
        packed_ids[i, chosen_end:end] = ids[pairs + i, prompt:rejected_end]
        positions[i, :chosen_end] = torch.arange(chosen_end, device=device)
        positions[i, chosen_end:end] = torch.arange(prompt, rejected_end, device=device)
        mask = causal.clone()
        mask[chosen_end:end, prompt:chosen_end] = False  # rejected never sees chosen
        mask[end:, :] = False
        mask[end:, end:] |= torch.eye(longest - end, dtype=torch.bool, device=device)
        allowed[i, 0] = mask
        # Chosen tokens (and, for a full-sequence NLL, the prompt's after its first).
        first = 1 if full_sequence_nll else prompt
        for at in range(first, chosen_end):
            rows.append(i)
            sources.append(at - 1)
            targets.append(at)
            kinds.append(CHOSEN if at >= prompt else PROMPT)
        for k in range(rejected):
            rows.append(i)
            sources.append(prompt - 1 if k == 0 else chosen_end + k - 1)
            targets.append(chosen_end + k)
            kinds.append(REJECTED)
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return Packed(packed_ids, positions, allowed, as_tensor(rows), as_tensor(sources),
                  as_tensor(targets), as_tensor(kinds))


def _attention_mask(model: Any, allowed: torch.Tensor) -> torch.Tensor:
    base = base_model(model)
    if MASK_KINDS[base.config._attn_implementation] == "bool":
        return allowed
    dtype = next(base.parameters()).dtype
    blocked = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return blocked.masked_fill(~allowed, torch.finfo(dtype).min)


def packed_logps(model: Any, packed: Packed, pairs: int, chunk: int | None):
    """Per pair: the chosen and rejected completions' summed log-probabilities and counts,
    and the NLL's sum and count (the chosen completion, or the whole chosen sequence)."""
    base = base_model(model)
    hidden = base.get_decoder()(input_ids=packed.input_ids,
                                attention_mask=_attention_mask(model, packed.allowed),
                                position_ids=packed.position_ids,
                                use_cache=False).last_hidden_state
    states = hidden[packed.rows, packed.predicted_from]
    targets = packed.input_ids[packed.rows, packed.target_at]
    logps = chunked_logps(states, targets, base.get_output_embeddings(),
                          chunk or max(len(targets), 1))

    def per_pair(kinds: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = torch.isin(packed.kinds, torch.tensor(kinds, device=packed.kinds.device))
        sums = logps.new_zeros(pairs).index_add(0, packed.rows[chosen], logps[chosen])
        counts = torch.zeros(pairs, dtype=torch.long, device=logps.device).index_add(
            0, packed.rows[chosen], torch.ones_like(packed.rows[chosen]))
        return sums, counts

    return per_pair((CHOSEN,)), per_pair((REJECTED,)), per_pair((CHOSEN, PROMPT))
