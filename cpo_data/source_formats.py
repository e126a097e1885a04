"""Read each source format into rows: JSONL, CSV/TSV, Parquet and saved HF datasets.

Separate from `cpo_data.sources` because reading a file is all these functions do: each format
becomes the same stream of (row number, dict), and `cpo_data.sources` alone decides what a row
means (its columns, the ALMA-R layout), so every format shares its checks and error messages.
Rows are numbered from 1 in file order: for JSONL that is the line number, for CSV/TSV the data
row after the header (a quoted field may span physical lines, so a CSV row number is not a line
number; errors the csv module raises name both). Blank lines (JSONL) and empty rows (CSV/TSV)
hold no data: skipped.
"""

from __future__ import annotations

import codecs
import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cpo_data.config import SourcesConfig
from cpo_data.errors import UserError

# csv refuses fields over 128 KiB by default, a bound meant to stop a runaway quoted field from
# filling memory. A field can be no larger than its file, and a quote that never closes is an
# error at the end of the file (`strict`), so the bound would only refuse long documents.
# 2**31 - 1 is the largest value every platform's C long holds (sys.maxsize overflows where long
# is 32-bit, as on Windows). The limit is the csv module's, for the whole process: raising it
# only admits longer fields.
FIELD_SIZE_LIMIT = 2**31 - 1


class SourceError(UserError):
    """Bad input, located: the file, the row (1-based) and the field."""

    def __init__(self, file: str, row: int | None, field: str | None, message: str):
        self.file, self.row, self.field = file, row, field
        where = [file]
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(f"{', '.join(where)}: {message}")


def _container(config: SourcesConfig) -> str:
    path = Path(config.path)
    fmt = config.format
    if fmt not in ("auto", "alma_r"):
        return fmt
    if path.is_dir():
        return "hf_dataset"
    suffix = path.suffix.lower()
    by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
    by_suffix[".parquet"] = "parquet"
    if suffix not in by_suffix:
        raise SourceError(
            config.path, None, "format",
            f"cannot tell the format from {suffix!r}; set format to one of "
            "jsonl, csv, tsv, parquet, hf_dataset",
        )
    return by_suffix[suffix]


def _not_utf8(path: str, offset: int, line: int, byte: int) -> SourceError:
    return SourceError(path, line, None, f"not UTF-8 (byte {byte:#04x} at offset {offset}); "
                       "re-encode the file as UTF-8")


def _binary_lines(path: str) -> Iterator[tuple[int, int, bytes]]:
    """(line number, offset, bytes) of each line, split at b"\n" only and read as the file is
    iterated: a source file is never held whole. A leading UTF-8 byte-order mark is skipped."""
    with open(path, "rb") as file:
        offset = 0
        for number, raw in enumerate(file, start=1):
            start = offset
            offset += len(raw)
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw, start = raw[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
            yield number, start, raw


def _decoded_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, ends kept; bytes that are not UTF-8 are named by
    line and offset."""
    for number, start, raw in _binary_lines(path):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as error:
            raise _not_utf8(path, start + error.start, number, raw[error.start]) from None


def _first_bad_byte(path: str) -> SourceError:
    """The error naming the first byte of `path` that is not UTF-8 (the file is read again,
    only when a reader that decodes in chunks has met it)."""
    for _ in _decoded_lines(path):
        pass
    raise AssertionError(f"{path}: a decoding error went away on rereading")


def _jsonl_rows(path: str) -> Iterator[tuple[int, dict]]:
    # Lines end at "\n" only: str.splitlines() also breaks at U+2028, U+2029, U+0085 and other
    # separators that JSON strings may hold unescaped. Blank means JSON whitespace only.
    for number, line in _decoded_lines(path):
        line = line.removesuffix("\n").removesuffix("\r")  # LF and CRLF files
        if not line.strip(" \t\r"):
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise SourceError(path, number, None, f"malformed JSON: {error.msg}") from None
        if not isinstance(row, dict):
            raise SourceError(path, number, None, f"expected a JSON object, got {row!r:.40}")
        yield number, row


def _delimited_rows(path: str, delimiter: str) -> Iterator[tuple[int, dict]]:
    # TSV bitext rarely quotes and often contains quote characters inside the text.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(FIELD_SIZE_LIMIT)
    # strict: a quote that opens a field and never closes is an error, where the lenient reader
    # would swallow the rest of the file into that field and lose every later row unsaid.
    kind = "TSV" if delimiter == "\t" else "CSV"
    # newline="": the csv module splits records itself (a quoted field may hold line breaks);
    # the file is decoded as it is read, never held whole.
    with open(path, encoding="utf-8-sig", newline="") as file:
        reader = csv.reader(file, delimiter=delimiter, quoting=quoting, strict=True)

        def read(number: int) -> list[str] | None:
            """Data row `number` (0: the header), or None at the end of the file."""
            starts = reader.line_num + 1
            try:
                return next(reader)
            except StopIteration:
                return None
            except UnicodeDecodeError:
                raise _first_bad_byte(path) from None
            except csv.Error as error:
                what = "the header" if number == 0 else "this row"
                raise SourceError(
                    path, number or None, None,
                    f"unreadable {kind}: {error} ({what} starts on line {starts}, the reader "
                    f"stopped on line {reader.line_num}); a quote that opens a field must "
                    "close it, and a quote inside a quoted field is written twice",
                ) from None

        header = read(0)
        if header is None:
            return
        number = 1
        while (values := read(number)) is not None:
            if values:
                if len(values) != len(header):
                    raise SourceError(
                        path, number, None,
                        f"has {len(values)} fields, the header has {len(header)}",
                    )
                yield number, dict(zip(header, values, strict=True))
            number += 1


def _parquet_rows(path: str) -> Iterator[tuple[int, dict]]:
    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise SourceError(path, None, None, f"not a readable Parquet file: {error}") from None
    number = 0
    for batch in parquet.iter_batches(batch_size=4096, use_threads=False):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _hf_rows(path: str, split: str | None) -> Iterator[tuple[int, dict]]:
    import datasets  # heavy; only this format needs it

    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise SourceError(path, None, None, f"not a saved Hugging Face dataset: {error}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise SourceError(
                path, None, "split",
                f"choose a split with `split:` (this dataset has {', '.join(loaded)})",
            )
        loaded = loaded[split]
    number = 0
    for batch in loaded.iter(batch_size=4096):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            number += 1
            yield number, dict(zip(columns, values, strict=True))


def read_rows(config: SourcesConfig) -> Iterator[tuple[int, dict]]:
    """The file's rows as (row number, dict), read as `format` says or, for auto and alma_r, as
    its suffix does (a folder is a saved HF dataset)."""
    path = config.path
    if not Path(path).exists():
        raise SourceError(path, None, None, "no such file or folder")
    container = _container(config)
    if container == "jsonl":
        return _jsonl_rows(path)
    if container in ("csv", "tsv"):
        return _delimited_rows(path, "," if container == "csv" else "\t")
    if container == "parquet":
        return _parquet_rows(path)
    return _hf_rows(path, config.split)
