"""Batches filled by token count, not row count: the planner both backends share."""

from __future__ import annotations

from collections.abc import Callable, Sequence


def token_budget_batches(lengths: Sequence[int], row_cost: Callable[[int], int], budget: int,
                         max_rows: int) -> list[list[int]]:
    """Row indices per batch, longest rows first.

    A batch costs rows x `row_cost(longest length in it)`; rows join it while that stays within
    `budget` and there are fewer than `max_rows`. A row that alone exceeds the budget still gets
    a batch of its own. Sorting first keeps padding low; callers restore their order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest first: the batch's first row sets its width.
        width = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * row_cost(width) > budget
                        or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
