"""Triplets to token ids, and batches that put chosen and rejected through one forward pass.

Each side is tokenized as prompt + completion in one call and then split where the prompt's own
tokens end: tokenizing them apart can merge or split tokens at the boundary differently from
what the model sees at inference (a known pitfall of preference training). Where the joint
tokenization changes the prompt's last tokens, the split falls at the longest common prefix.

- The prompt starts with BOS when the tokenizer has one; chosen and rejected end with EOS.
- Prompt tokens carry no loss (label -100).
- Truncation rule, for an example longer than `max_length` tokens: first the prompt is cut to
  `max_prompt_length` tokens, keeping its end (the part next to the completion; BOS stays in
  front); then each completion is cut at its end to fit `max_length`, losing its EOS. Every
  truncated example is counted in `TokenizeReport.truncated`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

IGNORE = -100


@dataclass
class Example:
    """One triplet as token ids; `*_ids` are prompt + completion."""

    chosen_ids: list[int]
    rejected_ids: list[int]
    chosen_prompt_length: int
    rejected_prompt_length: int


@dataclass
class TokenizeReport:
    examples: int = 0
    truncated: int = 0
    """Examples cut by the truncation rule."""
    truncated_ids: list[str] = field(default_factory=list)
    """Triplet ids of the truncated examples (first 20)."""


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


def tokenize_triplet(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                     max_prompt_length: int) -> tuple[Example, bool]:
    """Token ids of one triplet, and whether the truncation rule cut it."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id]
    sides = []
    truncated = False
    prompt_alone = _ids(tokenizer, prompt)  # once: both sides share it
    for completion in (chosen, rejected):
        prompt_ids, answer_ids = _split(tokenizer, prompt, prompt_alone, completion)
        answer_ids = answer_ids + eos
        if len(bos) + len(prompt_ids) + len(answer_ids) > max_length:
            truncated = True
            keep = max(max_prompt_length - len(bos), 0)
            prompt_ids = prompt_ids[len(prompt_ids) - keep:] if keep else []
            answer_ids = answer_ids[: max(max_length - len(bos) - len(prompt_ids), 0)]
        sides.append((bos + prompt_ids, answer_ids))
    (chosen_prompt, chosen_answer), (rejected_prompt, rejected_answer) = sides
    return Example(chosen_prompt + chosen_answer, rejected_prompt + rejected_answer,
                   len(chosen_prompt), len(rejected_prompt)), truncated


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
        examples.append(example)
        report.examples += 1
        if truncated:
            report.truncated += 1
            if len(report.truncated_ids) < 20:
                report.truncated_ids.append(str(row.get("id", number)))
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
