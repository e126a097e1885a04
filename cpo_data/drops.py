"""One way for every stage to record what it leaves out: a row of `schema.DROPPED` per drop.

Ingestion, generation, scoring and selection all record through `Drops`, so every dropped row
has the same columns and a reason, and a stage's per-reason counts are read off the same rows
it hands on: a count cannot say something the rows do not.
"""

from __future__ import annotations

import pyarrow as pa

from cpo_data import schema


class Drops:
    """Dropped rows of one stage run, in the order they were added."""

    def __init__(self) -> None:
        self._rows: list[dict] = []

    def add(self, source_id: str, lang_pair: str, reason: str, detail: str | None = None) -> None:
        """Record one left-out source, output or pair; `detail` says which one and why."""
        self._rows.append({"source_id": source_id, "lang_pair": lang_pair, "reason": reason,
                           "detail": detail})

    def table(self) -> pa.Table:
        """The rows as a `schema.DROPPED` table (no rows if nothing was dropped)."""
        return pa.Table.from_pylist(self._rows, schema=schema.DROPPED)

    def counts(self) -> dict[str, int]:
        """Rows per reason, reasons in the order first seen."""
        found: dict[str, int] = {}
        for row in self._rows:
            found[row["reason"]] = found.get(row["reason"], 0) + 1
        return found

    def __len__(self) -> int:
        return len(self._rows)
