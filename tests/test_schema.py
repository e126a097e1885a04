import pyarrow as pa
import pytest

from cpo_data import schema
from cpo_data.testing import sample_triplets


def test_valid_table_passes_and_keeps_schema_columns_in_order():
    table = sample_triplets(2).append_column("extra", pa.array(["x"] * 4))
    out = schema.validate(table.select(list(reversed(table.column_names))), schema.TRIPLETS)
    assert out.schema.equals(schema.TRIPLETS)
    assert out.num_rows == 4


def test_missing_column_is_named():
    table = sample_triplets(1).drop_columns(["rejected"])
    with pytest.raises(schema.SchemaError, match="missing column 'rejected'"):
        schema.validate(table, schema.TRIPLETS)


def test_mistyped_column_is_named():
    table = sample_triplets(1)
    index = table.column_names.index("margin")
    table = table.set_column(index, "margin", pa.array(["big"] * table.num_rows))
    with pytest.raises(schema.SchemaError, match="column 'margin' has type string"):
        schema.validate(table, schema.TRIPLETS, what="my triplets")


def test_null_in_required_column_names_column_and_row():
    table = sample_triplets(2)
    index = table.column_names.index("chosen")
    values = table.column("chosen").to_pylist()
    values[2] = None
    table = table.set_column(index, "chosen", pa.array(values))
    with pytest.raises(schema.SchemaError, match="column 'chosen' is null in row 3"):
        schema.validate(table, schema.TRIPLETS)


def test_large_string_columns_are_accepted_and_cast():
    table = sample_triplets(1)
    table = table.set_column(table.column_names.index("src"), "src",
                             table.column("src").cast(pa.large_string()))
    assert schema.validate(table, schema.TRIPLETS).schema.field("src").type == pa.string()


def test_every_stage_has_a_schema_and_triplets_have_trainer_columns():
    assert set(schema.SCHEMAS) == {"sources", "candidates", "scores", "triplets", "dropped"}
    assert {"prompt", "chosen", "rejected"} <= set(schema.TRIPLETS.names)
    assert schema.SCHEMA_VERSION >= 1
