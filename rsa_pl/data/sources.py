"""Load real preference datasets into one canonical row format.

`load_source(path, schema)` reads a local file (.parquet, .json, .jsonl, .arrow), a directory
written by `datasets` `save_to_disk`, or, when `path` does not exist locally, a Hugging Face hub
id, and maps every row of the named schema onto the canonical row:

    {"prompt", "response_0", "response_1", "better_response_id", "safer_response_id",
     "is_response_0_safe", "is_response_1_safe", "category", "categories", "severity"}

PKU-SafeRLHF comes in two schemas, both read as "pku_saferlhf": the 30K release (an optional
`category` column) and the current one, whose responses each carry `response_<i>_harm_category`
(a map of its 19 harm categories to true/false) and `response_<i>_severity_level` (0 safe, 1 minor
to 3 severe), besides `prompt_source`, `response_<i>_source` and `response_<i>_sha256`, which are
not needed. `categories` are the harm categories true for the row's unsafe responses (response_0's
first, each once, in the dataset's column order), `category` the first of them (or the `category`
column where there is one), `severity` the larger severity level.

A bad row never fails the load: it is skipped and recorded as a `Reject` with a short, stable
reason code ("missing field: prompt", "invalid json", "duplicate row", ...), so that every input
row ends up in exactly one of `rows` and `rejects`. Only a file that cannot be used at all (not
readable, no rows, a required column absent everywhere) raises `DataError`, whose message is one
line naming the file and, where relevant, the column.
"""

from __future__ import annotations

import codecs
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

__all__ = [
    "SCHEMAS",
    "DataError",
    "PromptSet",
    "Reject",
    "SourceResult",
    "load_prompts",
    "load_source",
    "reject_counts",
]

MAX_TEXT_CHARS = 100_000
"""Longer texts are rejected ("too long: <name>"): they are scraping accidents, not dialogue."""

ASSISTANT_TURN = "\n\nAssistant:"
BATCH_ROWS = 1024


class DataError(ValueError):
    """A source that cannot be used at all; str(error) is one line naming the file (and column)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.splitlines()))


@dataclass(frozen=True)
class Reject:
    """One skipped input row: where it was, why it was skipped, and its raw (JSON-safe) content."""

    source: str
    """The file path or hub id."""
    row: int
    """0-based index of the row in the source (blank JSON lines are not rows)."""
    reason: str
    """Short stable reason code, e.g. "missing field: response_1"."""
    data: dict
    """The raw row, JSON-serialisable (bytes and other odd objects as their repr)."""


@dataclass(frozen=True)
class SourceResult:
    """The canonical rows of a source and the rows skipped on the way."""

    rows: list[dict]
    rejects: list[Reject]
    indices: list[int]
    """Where each of rows is in the source (0-based, as Reject.row)."""


def reject_counts(rejects: list[Reject]) -> dict[str, int]:
    """Number of rejects per reason, sorted by reason: the summary a stage logs."""
    return dict(sorted(Counter(reject.reason for reject in rejects).items()))


# ---------------------------------------------------------------------------------------------
# Row checks: each raises _RowError(reason) so a converter reads as a list of field accesses.


class _RowError(Exception):
    """A bad row; `reason` is the Reject reason code."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _required(raw: dict, name: str) -> Any:
    """The value of a required field; absent and None are the same problem."""
    value = raw.get(name)
    if value is None:
        raise _RowError(f"missing field: {name}")
    return value


def _is_utf8(text: str) -> bool:
    """False for strings with lone surrogates (e.g. from a JSON "\\ud800" escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _checked_text(text: Any, name: str) -> str:
    """`text` if it is a non-empty, UTF-8-encodable string of at most MAX_TEXT_CHARS characters."""
    if not isinstance(text, str):
        raise _RowError(f"not a string: {name}")
    if not _is_utf8(text):
        raise _RowError(f"invalid utf-8: {name}")
    if not text.strip():
        raise _RowError(f"empty text: {name}")
    if len(text) > MAX_TEXT_CHARS:
        raise _RowError(f"too long: {name}")
    return text


def _text(raw: dict, name: str) -> str:
    return _checked_text(_required(raw, name), name)


def _response_id(raw: dict, name: str) -> int:
    """A required 0/1 id; bool is rejected because True/False there means a mislabelled column."""
    value = _required(raw, name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _RowError(f"not an integer: {name}")
    if value not in (0, 1):
        raise _RowError(f"id out of range: {name}")
    return value


def _flag(raw: dict, name: str) -> bool:
    value = _required(raw, name)
    if not isinstance(value, bool):
        raise _RowError(f"not a boolean: {name}")
    return value


def _optional_int(raw: dict, name: str) -> int | None:
    value = raw.get(name)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise _RowError(f"not an integer: {name}")
    return value


def _optional_str(raw: dict, name: str) -> str | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, str):
        raise _RowError(f"not a string: {name}")
    return value


def _optional_flag(raw: dict, name: str) -> bool | None:
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise _RowError(f"not a boolean: {name}")
    return value


def _harm_categories(raw: dict, name: str) -> dict[str, bool | None]:
    """PKU-SafeRLHF's {category name: bool} map; None values come from columnar formats' null-fill."""
    value = raw.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(v is None or isinstance(v, bool) for v in value.values()):
        raise _RowError(f"not a category map: {name}")
    return value


# ---------------------------------------------------------------------------------------------
# Schemas: raw row -> canonical row.


def _canonical(
    prompt: str,
    response_0: str,
    response_1: str,
    better_response_id: int,
    *,
    safer_response_id: int | None = None,
    is_response_0_safe: bool | None = None,
    is_response_1_safe: bool | None = None,
    categories: tuple[str, ...] = (),
    severity: int | None = None,
    harmful: bool | None = None,
) -> dict:
    """The canonical row; safety fields stay None (unknown) for helpfulness-only schemas, and
    `harmful` (the prompt's own label) for sources without a `harmful` column."""
    if response_0.strip() == response_1.strip():
        raise _RowError("identical responses")
    return {
        "prompt": prompt,
        "response_0": response_0,
        "response_1": response_1,
        "better_response_id": better_response_id,
        "safer_response_id": safer_response_id,
        "is_response_0_safe": is_response_0_safe,
        "is_response_1_safe": is_response_1_safe,
        "category": categories[0] if categories else None,
        "categories": categories,
        "severity": severity,
        "harmful": harmful,
    }


def _pku_categories(raw: dict, safe: tuple[bool, bool]) -> tuple[str, ...]:
    """(`category`,), else the true harm categories of the unsafe response(s) (current PKU-SafeRLHF)."""
    category = _optional_str(raw, "category")
    harms = [_harm_categories(raw, f"response_{i}_harm_category") for i in (0, 1)]
    if category is not None:
        return (category,)
    unsafe_harms = (name for i in (0, 1) if not safe[i] for name, flag in harms[i].items() if flag)
    return tuple(dict.fromkeys(unsafe_harms))


def _pku_severity(raw: dict) -> int | None:
    """`severity`, else the larger of the two per-response severity levels (newer PKU-SafeRLHF)."""
    severity = _optional_int(raw, "severity")
    levels = [_optional_int(raw, f"response_{i}_severity_level") for i in (0, 1)]
    if severity is not None:
        return severity
    known = [level for level in levels if level is not None]
    return max(known) if known else None


def _pku_saferlhf_row(raw: dict) -> dict:
    """PKU-Alignment/PKU-SafeRLHF(-30K): both preferences and per-response safety labels."""
    texts = [_text(raw, name) for name in ("prompt", "response_0", "response_1")]
    safe = (_flag(raw, "is_response_0_safe"), _flag(raw, "is_response_1_safe"))
    better, safer = _response_id(raw, "better_response_id"), _response_id(raw, "safer_response_id")
    categories, severity = _pku_categories(raw, safe), _pku_severity(raw)
    return _canonical(
        *texts,
        better,
        safer_response_id=safer,
        is_response_0_safe=safe[0],
        is_response_1_safe=safe[1],
        categories=categories,
        severity=severity,
        harmful=_optional_flag(raw, "harmful"),
    )


def _split_transcript(transcript: str) -> tuple[str, str]:
    """(prompt up to and including the last assistant turn marker, final assistant reply), both stripped."""
    end = transcript.rfind(ASSISTANT_TURN)
    if end < 0:
        raise _RowError("no assistant turn")
    end += len(ASSISTANT_TURN)
    return transcript[:end].strip(), transcript[end:].strip()


def _hh_row(raw: dict) -> dict:
    """Anthropic HH-RLHF: two full transcripts that share every turn but the last reply."""
    chosen, rejected = _text(raw, "chosen"), _text(raw, "rejected")
    (prompt, response_0), (rejected_prompt, response_1) = _split_transcript(chosen), _split_transcript(rejected)
    if prompt != rejected_prompt:
        raise _RowError("prompt mismatch")
    return _canonical(prompt, _checked_text(response_0, "response_0"), _checked_text(response_1, "response_1"), 0,
                      harmful=_optional_flag(raw, "harmful"))  # fmt: skip


def _pairs_row(raw: dict) -> dict:
    """Generic prompt/chosen/rejected pairs."""
    return _canonical(_text(raw, "prompt"), _text(raw, "chosen"), _text(raw, "rejected"), 0,
                      harmful=_optional_flag(raw, "harmful"))  # fmt: skip


def _prompts_row(raw: dict) -> dict:
    """A prompt alone (pairs are made on-policy by the pairs stage): an optional category, and an
    optional `harmful` flag (else: a prompt with a category is a red-team prompt, as in
    Do-Not-Answer, HarmBench or AdvBench files)."""
    category = _optional_str(raw, "category")
    harmful = _optional_flag(raw, "harmful")
    return {"prompt": _text(raw, "prompt"), "category": category, "categories": (category,) if category else (),
            "severity": None, "harmful": harmful if harmful is not None else category is not None}  # fmt: skip


_CONVERTERS: dict[str, Callable[[dict], dict]] = {
    "pku_saferlhf": _pku_saferlhf_row,
    "hh": _hh_row,
    "jsonl": _pairs_row,
    "prompts": _prompts_row,
}
_REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "pku_saferlhf": (
        "prompt",
        "response_0",
        "response_1",
        "is_response_0_safe",
        "is_response_1_safe",
        "better_response_id",
        "safer_response_id",
    ),
    "hh": ("chosen", "rejected"),
    "jsonl": ("prompt", "chosen", "rejected"),
    "prompts": ("prompt",),
}
SCHEMAS = tuple(_CONVERTERS)


# ---------------------------------------------------------------------------------------------
# Readers: each yields one item per input row: a raw value (normally a dict) or a _BadLine.


@dataclass(frozen=True)
class _BadLine:
    """A JSON line that did not even parse; rejected before any schema check."""

    reason: str
    data: dict


def _jsonable(value: Any) -> Any:
    """`value` made JSON-serialisable so a Reject can be written out: odd objects become their repr."""
    if isinstance(value, str):
        return value if _is_utf8(value) else value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, bool | int) or (isinstance(value, float) and math.isfinite(value)):
        return value
    if isinstance(value, dict):
        return {str(_jsonable(key)): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return repr(value)


def _parse_line(line: bytes) -> object:
    """One JSON line's value, or a _BadLine when it is not UTF-8 or not JSON."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return _BadLine("invalid utf-8", {"line": repr(line)})
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # ValueError also covers ints over Python's digit limit
        return _BadLine("invalid json", {"line": _jsonable(text)})


def _read_json_lines(path: str) -> Iterator[object]:
    """One value per non-blank line; read by hand so one bad line is one reject, not a failed file."""
    with open(path, "rb") as file:
        for number, line in enumerate(file):
            if number == 0:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield _parse_line(line)


def _read_json(path: str) -> Iterator[object]:
    """A JSON array of objects, or else JSON lines."""
    content = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    if content.lstrip().startswith(b"["):
        try:
            values = json.loads(content.decode("utf-8"))
        except (ValueError, RecursionError):
            values = None  # not one array after all: fall back to lines, so bad lines become rejects
        if isinstance(values, list):
            yield from values
            return
    yield from _read_json_lines(path)


def _batch_rows(batches: Iterable[pa.RecordBatch | pa.Table]) -> Iterator[dict]:
    for batch in batches:
        yield from batch.to_pylist()


def _read_parquet(path: str) -> Iterator[dict]:
    yield from _batch_rows(pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS))


def _read_csv(path: str) -> Iterator[dict]:
    """A CSV file with a header row; pyarrow infers each column's type (true/false: booleans)."""
    try:
        yield from _batch_rows(pa_csv.read_csv(path).to_batches(max_chunksize=BATCH_ROWS))
    except pa.ArrowInvalid as error:
        raise DataError(f"{path}: cannot read as CSV: {_first_line(error)}") from None


def _read_arrow(path: str) -> Iterator[dict]:
    """An Arrow IPC stream (what `datasets` writes) or, failing that, an Arrow IPC file."""
    with pa.memory_map(path) as source:
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            source.seek(0)
            file_reader = pa.ipc.open_file(source)
            reader = (file_reader.get_batch(i) for i in range(file_reader.num_record_batches))
        yield from _batch_rows(reader)


def _dataset_rows(dataset: datasets.Dataset | datasets.IterableDataset) -> Iterator[dict]:
    yield from _batch_rows(dataset.with_format("arrow").iter(batch_size=BATCH_ROWS))


def _pick_split(path: str, loaded: Any, split: str) -> datasets.Dataset:
    """The requested split of a DatasetDict; a plain Dataset is its own only split."""
    if not isinstance(loaded, datasets.DatasetDict):
        return loaded
    if split not in loaded:
        raise DataError(f"{path}: no split '{split}' (available: {', '.join(loaded)})")
    return loaded[split]


def _read_saved(path: str, split: str) -> Iterator[dict]:
    """A directory written by Dataset.save_to_disk or DatasetDict.save_to_disk."""
    yield from _dataset_rows(_pick_split(path, datasets.load_from_disk(path), split))


_FILE_READERS: dict[str, Callable[[str], Iterator[object]]] = {
    ".parquet": _read_parquet,
    ".json": _read_json,
    ".jsonl": _read_json_lines,
    ".arrow": _read_arrow,
    ".csv": _read_csv,
}


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(error).__name__


def _guarded(path: str, rows: Iterator[object]) -> Iterator[object]:
    """`rows` with any failure to read them (I/O, corrupt file, not a dataset) turned into DataError."""
    try:
        yield from rows
    except DataError:
        raise
    except Exception as error:  # the reader only does I/O; whatever breaks it makes the file unusable
        raise DataError(f"{path}: cannot read: {_first_line(error)}") from error


def _read_hub(path: str, split: str) -> Iterator[dict]:
    """A hub id (or a dataset in the local hub cache), loaded through `datasets`."""
    try:
        dataset = datasets.load_dataset(path, split=split)
    except Exception as error:  # hub, network and cache failures all mean the same to the caller
        message = f"{type(error).__name__}: {_first_line(error)}"
        raise DataError(f"{path}: cannot load from the hub or cache ({message})") from error
    yield from _guarded(path, _dataset_rows(dataset))


def _read(path: str, split: str) -> Iterator[object]:
    """The raw rows of `path`: a saved dataset directory, a local file by suffix, or a hub id."""
    if os.path.isdir(path):
        return _guarded(path, _read_saved(path, split))
    if not os.path.exists(path):
        return _read_hub(path, split)
    suffix = Path(path).suffix.lower()
    if suffix not in _FILE_READERS:
        raise DataError(f"{path}: cannot read: unsupported file type '{suffix}' (expected {', '.join(_FILE_READERS)})")
    return _guarded(path, _FILE_READERS[suffix](path))


# ---------------------------------------------------------------------------------------------
# Loading.


def _convert(raw: object, convert: Callable[[dict], dict]) -> dict:
    """The canonical row of one raw value, or _RowError."""
    if isinstance(raw, _BadLine):
        raise _RowError(raw.reason)
    if not isinstance(raw, dict):
        raise _RowError("not an object")
    return convert(raw)


def _reject_data(raw: object) -> dict:
    if isinstance(raw, _BadLine):
        return raw.data
    return _jsonable(raw) if isinstance(raw, dict) else {"value": _jsonable(raw)}


def _check_columns(path: str, schema: str, columns: set[str] | None) -> None:
    """A required column absent from every row is a wrong schema or file, not a few bad rows."""
    if columns is None:  # no row was an object: every row is already a reject with its reason
        return
    for name in _REQUIRED_COLUMNS[schema]:
        if name not in columns:
            raise DataError(f"{path}: missing required column '{name}' (schema {schema})")


def load_source(path: str, schema: str, split: str = "train") -> SourceResult:
    """Canonical rows of `path` read with `schema` (one of SCHEMAS); bad rows become Rejects.

    `split` picks the split of a saved DatasetDict or a hub dataset. Raises DataError (one line)
    when the source cannot be read, has no rows, or lacks a required column altogether.
    """
    if schema not in _CONVERTERS:
        raise DataError(f"{path}: unknown schema '{schema}' (expected one of {', '.join(SCHEMAS)})")
    convert = _CONVERTERS[schema]
    rows: list[dict] = []
    indices: list[int] = []
    rejects: list[Reject] = []
    accepted: set[tuple] = set()
    columns: set[str] | None = None  # None until a row is an object
    for index, raw in enumerate(_read(path, split)):
        if isinstance(raw, dict):
            columns = columns or set()
            columns.update(raw)
        try:
            row = _convert(raw, convert)
            if tuple(row.values()) in accepted:
                raise _RowError("duplicate row")
        except _RowError as error:
            rejects.append(Reject(path, index, error.reason, _reject_data(raw)))
            continue
        accepted.add(tuple(row.values()))
        rows.append(row)
        indices.append(index)
    if not rows and not rejects:
        raise DataError(f"{path}: no rows")
    _check_columns(path, schema, columns)
    return SourceResult(rows, rejects, indices)


@dataclass(frozen=True)
class PromptSet:
    """The prompts of an evaluation prompt file: rows {"prompt", "category"}, each prompt once."""

    rows: list[dict]
    rejects: list[Reject]
    indices: list[int]
    """Where each of rows is in the source (0-based, as Reject.row)."""
    read: int
    """Rows in the source."""
    outside: int
    """Rows left out by the `where` filter (not rejects: rows of another subset)."""


def _prompt_row(raw: dict, prompt_column: str, category_column: str | None) -> dict:
    category = _optional_str(raw, category_column) if category_column is not None else None
    return {"prompt": _text(raw, prompt_column), "category": category}


def load_prompts(
    path: str, split: str, prompt_column: str, category_column: str | None, where: dict[str, str | int | bool]
) -> PromptSet:
    """The prompts of a benchmark file (JSONL, JSON, CSV, parquet, arrow, a save_to_disk folder or a
    hub id): the text in `prompt_column`, an optional category in `category_column`, only rows whose
    columns equal every value in `where`. A bad row (no prompt text, a category that is not a
    string) and a repeated prompt are rejects; a column absent from every row is a DataError."""
    rows: list[dict] = []
    indices: list[int] = []
    rejects: list[Reject] = []
    seen: set[str] = set()
    columns: set[str] | None = None
    read = outside = 0
    for index, raw in enumerate(_read(path, split)):
        read += 1
        if isinstance(raw, dict):
            columns = columns or set()
            columns.update(raw)
            if any(raw.get(column) != value for column, value in where.items()):
                outside += 1
                continue
        try:
            row = _convert(raw, lambda r: _prompt_row(r, prompt_column, category_column))
            if row["prompt"] in seen:
                raise _RowError("duplicate prompt")
        except _RowError as error:
            rejects.append(Reject(path, index, error.reason, _reject_data(raw)))
            continue
        seen.add(row["prompt"])
        rows.append(row)
        indices.append(index)
    if not read:
        raise DataError(f"{path}: no rows")
    if columns is not None:
        wanted = [("prompt_column", prompt_column), ("category_column", category_column)]
        for key, column in [*wanted, *(("where", c) for c in where)]:
            if column is not None and column not in columns:
                found = ", ".join(sorted(columns)[:12])
                raise DataError(f"{path}: no column '{column}' ({key}; the columns are: {found})")
    return PromptSet(rows, rejects, indices, read, outside)
