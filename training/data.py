"""Triplets to token ids, and batches that put chosen and rejected through one forward pass.

Each side is tokenized as prompt + completion in one call and then split where the prompt's own
tokens end: tokenizing them apart can merge or split tokens at the boundary differently from
what the model sees at inference (a known pitfall of preference training). Where the joint
tokenization changes the prompt's last tokens, the split falls at the longest common prefix.

- The prompt starts with one BOS when the tokenizer has one, and each completion ends with one
  EOS; a text that already carries them (`<s>...`, `...</s>`) does not get a second.
- Prompt tokens carry no loss (label -100).
- Truncation, per pair: when prompt + chosen or prompt + rejected is longer than `max_length`,
  the prompt is cut once for both sides to at most `max_prompt_length` tokens, keeping its end
  (the part next to the completion; BOS stays in front); a prompt that is already that short
  is kept whole. Then each completion longer than what is left of `max_length` loses its end
  (and its EOS). As `max_prompt_length < max_length`, every completion keeps at least one
  token. Cut pairs are counted in `TokenizeReport.truncated`.
- A pair whose chosen or rejected completion has no tokens of its own (an empty text, or one
  that adds no token to the prompt's) is left out and counted in `TokenizeReport.left_out`:
  an EOS alone would teach the model to answer with nothing, and a per-token mean over no
  tokens is undefined.

TRL's CPO/ORPO trainers never cut the prompt: they cut the completion to what the prompt
leaves of `max_length`, down to nothing when the prompt alone fills it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE = -100
EMPTY_COMPLETION = "empty_completion"
"""Why a pair is left out: a completion with no tokens of its own."""


@dataclass
class Example:
    """One triplet as token ids; `*_ids` are prompt + completion. The two prompts are the same
    tokens except where the joint tokenization merges the last one with the completion."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prompt_length: int
    rejected_prompt_length: int


@dataclass
class TokenizeReport:
    examples: int = 0
    """Examples made (left-out pairs not included)."""
    truncated: int = 0
    """Examples cut by the truncation rule."""
    truncated_ids: list[str] = field(default_factory=list)
    """Triplet ids of the truncated examples (first 20)."""
    left_out: dict[str, int] = field(default_factory=dict)
    """Pairs left out, per reason (`empty_completion`)."""
    left_out_ids: list[str] = field(default_factory=list)
    """Triplet ids of the left-out pairs (first 20)."""


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _split(tokenizer, prompt: str, prompt_ids: list[int],
           completion: str) -> tuple[list[int], list[int]]:
    """Prompt and completion ids as the joint tokenization has them."""
    full = _ids(tokenizer, prompt + completion)
    common = 0
    for a, b in zip(prompt_ids, full, strict=False):
        if a != b:
            break
        common += 1
    return full[:common], full[common:]


def _strip(ids: list[int], token: int | None, leading: bool) -> list[int]:
    """`ids` without the special `token` the text itself carried at its start (or end)."""
    if token is None:
        return ids
    if leading:
        while ids[:1] == [token]:
            ids = ids[1:]
    else:
        while ids[-1:] == [token]:
            ids = ids[:-1]
    return ids


def tokenize_triplet(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                     max_prompt_length: int) -> tuple[Example | None, bool]:
    """Token ids of one triplet (None when it is left out), and whether truncation cut it."""
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    bos = [bos_id] if bos_id is not None else []
    prompt_alone = _ids(tokenizer, prompt)  # once: both sides share it
    sides = []
    for completion in (chosen, rejected):
        prompt_ids, answer_ids = _split(tokenizer, prompt, prompt_alone, completion)
        answer_ids = _strip(answer_ids, eos_id, leading=False)
        if not answer_ids:
            return None, False
        sides.append((_strip(prompt_ids, bos_id, leading=True), answer_ids + [eos_id]))
    truncated = max(len(bos) + len(p) + len(a) for p, a in sides) > max_length
    if truncated:
        # One cut for the pair: the same leading prompt tokens leave both sides, so chosen and
        # rejected keep one prompt. Never more than the prompt has (a short prompt stays whole).
        keep = max(max_prompt_length - len(bos), 0)
        drop = max(max(len(p) for p, _ in sides) - keep, 0)
        sides = [(p[drop:], a[: max_length - len(bos) - len(p[drop:])]) for p, a in sides]
    (chosen_prompt, chosen_answer), (rejected_prompt, rejected_answer) = sides
    return Example(bos + chosen_prompt + chosen_answer, bos + rejected_prompt + rejected_answer,
                   len(bos) + len(chosen_prompt), len(bos) + len(rejected_prompt)), truncated


def tokenize_triplets(tokenizer, rows: Sequence[dict], max_length: int = 512,
                      max_prompt_length: int = 256) -> tuple[list[Example], TokenizeReport]:
    """Examples for triplet rows (dicts with `prompt`, `chosen`, `rejected`, optional `id`)."""
    if max_prompt_length >= max_length:
        raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length "
                         f"({max_length})")
    report = TokenizeReport()
    examples = []
    for number, row in enumerate(rows):
        example, truncated = tokenize_triplet(tokenizer, row["prompt"], row["chosen"],
                                              row["rejected"], max_length, max_prompt_length)
        row_id = str(row.get("id", number))
        if example is None:
            report.left_out[EMPTY_COMPLETION] = report.left_out.get(EMPTY_COMPLETION, 0) + 1
            if len(report.left_out_ids) < 20:
                report.left_out_ids.append(row_id)
            continue
        examples.append(example)
        report.examples += 1
        if truncated:
            report.truncated += 1
            if len(report.truncated_ids) < 20:
                report.truncated_ids.append(row_id)
    return examples, report


def collate(examples: Sequence[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One batch: the chosen sequences, then the rejected ones, right-padded to the longest.

    Rows `[:n]` are chosen and `[n:]` rejected, so one forward pass serves both sides."""
    sequences = ([(e.chosen_ids, e.chosen_prompt_length) for e in examples]
                 + [(e.rejected_ids, e.rejected_prompt_length) for e in examples])
    longest = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    labels = torch.full((len(sequences), longest), IGNORE, dtype=torch.long)
    for row, (ids, prompt_length) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_length: len(ids)] = torch.tensor(ids[prompt_length:],
                                                            dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
