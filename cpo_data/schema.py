"""The table contract between stages: every column name and type lives here.

Each stage consumes and produces one of these Arrow tables. Per-system and per-scorer values are
`list<struct>` rather than Arrow maps because Hugging Face `datasets` has no map type: a published
version must load there without a conversion step.
"""

from __future__ import annotations

import pyarrow as pa

from cpo_data.errors import UserError

SCHEMA_VERSION = 3
"""Bumped whenever a column is added, removed, renamed or retyped.

2: `chosen_scores` / `rejected_scores` entries gained `error_spans` (XCOMET's, null for other
scorers). 3: triplets gained `confidence`. The store reads older datasets by adding what they
lack as null (`store.py`)."""

SYSTEM_OUTPUT = pa.struct([("system", pa.string()), ("text", pa.string())])
ERROR_SPAN = pa.struct(
    [
        ("text", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("severity", pa.string()),
        ("confidence", pa.float64()),
    ]
)
# Spans sit next to the score whose model found them, so two XCOMET scorers stay apart.
SCORER_SCORE = pa.struct(
    [
        ("scorer", pa.string()),
        ("score", pa.float64()),
        ("error_spans", pa.list_(ERROR_SPAN)),  # null: the scorer gives no spans
    ]
)

SOURCES = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("lang_pair", pa.string(), nullable=False),
        pa.field("src_lang", pa.string(), nullable=False),
        pa.field("tgt_lang", pa.string(), nullable=False),
        pa.field("src", pa.string(), nullable=False),
        pa.field("ref", pa.string()),
        # Outputs of systems the user already has (GPT-4, a production engine, ...).
        pa.field("systems", pa.list_(SYSTEM_OUTPUT), nullable=False),
        # A human preference between two provided systems (ALMA-R's `Delta`), when labelled.
        pa.field("human_preferred", pa.string()),
        pa.field("human_dispreferred", pa.string()),
        pa.field("human_delta", pa.float64()),
        # How many input rows collapsed into this one, and where the first one came from.
        pa.field("duplicates", pa.int32(), nullable=False),
        pa.field("origin", pa.string(), nullable=False),
    ]
)

CANDIDATES = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("systems", pa.list_(pa.string()), nullable=False),
        pa.field("generator", pa.string()),
        pa.field("decoding", pa.string()),  # JSON of the decoding parameters, null if provided
        # The generation ran to max_new_tokens without ending (`generate.stopped_at_limit`);
        # null for provided outputs and where the generator did not say.
        pa.field("stopped_at_limit", pa.bool_()),
    ]
)

SCORES = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("text", pa.string(), nullable=False),
        pa.field("scorer", pa.string(), nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("error_spans", pa.list_(ERROR_SPAN)),  # XCOMET only
    ]
)

TRIPLETS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("lang_pair", pa.string(), nullable=False),
        pa.field("src_lang", pa.string(), nullable=False),
        pa.field("tgt_lang", pa.string(), nullable=False),
        pa.field("src", pa.string(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("chosen", pa.string(), nullable=False),
        pa.field("rejected", pa.string(), nullable=False),
        pa.field("chosen_system", pa.string(), nullable=False),
        pa.field("rejected_system", pa.string(), nullable=False),
        pa.field("chosen_score", pa.float64()),
        pa.field("rejected_score", pa.float64()),
        pa.field("margin", pa.float64()),
        # The margin in units of the ranking score's noise threshold; null where it has none.
        pa.field("confidence", pa.float64()),
        pa.field("chosen_scores", pa.list_(SCORER_SCORE), nullable=False),
        pa.field("rejected_scores", pa.list_(SCORER_SCORE), nullable=False),
        pa.field("selected_by", pa.string(), nullable=False),  # "score" or "human_label"
    ]
)

DROPPED = pa.schema(
    [
        pa.field("source_id", pa.string(), nullable=False),
        pa.field("lang_pair", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
    ]
)

SCHEMAS = {
    "sources": SOURCES,
    "candidates": CANDIDATES,
    "scores": SCORES,
    "triplets": TRIPLETS,
    "dropped": DROPPED,
}


class SchemaError(UserError):
    """A table that does not match its stage's schema; the message names the column."""


def _plain(type_: pa.DataType) -> pa.DataType:
    """large_string and string (and their lists) hold the same values; compare them as one."""
    if pa.types.is_large_string(type_) or pa.types.is_string_view(type_):
        return pa.string()
    if pa.types.is_large_list(type_) or pa.types.is_list(type_):
        return pa.list_(_plain(type_.value_type))
    if pa.types.is_struct(type_):
        return pa.struct([pa.field(f.name, _plain(f.type)) for f in type_])
    if pa.types.is_dictionary(type_):
        return _plain(type_.value_type)
    return type_


def validate(table: pa.Table, schema: pa.Schema, *, what: str = "table") -> pa.Table:
    """Check `table` against `schema` and return it with exactly the schema's columns.

    Names the first missing column, mistyped column, or null in a non-nullable column. Extra
    columns are dropped; column order follows the schema. `what` names the table in messages.
    """
    columns = []
    for field in schema:
        if field.name not in table.column_names:
            raise SchemaError(f"{what}: missing column {field.name!r} ({field.type})")
        column = table.column(field.name)
        if _plain(column.type) != _plain(field.type) and not (
            pa.types.is_null(column.type) and field.nullable
        ):
            raise SchemaError(
                f"{what}: column {field.name!r} has type {column.type}, expected {field.type}"
            )
        if not field.nullable and column.null_count:
            first = column.is_null().to_pylist().index(True)
            raise SchemaError(f"{what}: column {field.name!r} is null in row {first + 1}")
        columns.append(column.cast(field.type) if column.type != field.type else column)
    return pa.Table.from_arrays(columns, schema=schema)


def empty(schema: pa.Schema) -> pa.Table:
    """A table with the schema's columns and no rows."""
    return schema.empty_table()
