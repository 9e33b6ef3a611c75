"""load_source: real schemas to canonical rows, bad rows to rejects, unusable files to one-line DataErrors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rsa_pl.data.sources import SCHEMAS, DataError, Reject, load_source, reject_counts
from tests.helpers import CURRENT_PKU_ROWS, write_current_pku

DATA = Path(__file__).parent / "data"
SAMPLES = {
    "pku_saferlhf": DATA / "pku_saferlhf_sample.jsonl",
    "hh": DATA / "hh_sample.jsonl",
    "jsonl": DATA / "pairs_sample.jsonl",
    "prompts": DATA / "prompts_sample.jsonl",
}
CANONICAL_KEYS = {
    "prompt",
    "response_0",
    "response_1",
    "better_response_id",
    "safer_response_id",
    "is_response_0_safe",
    "is_response_1_safe",
    "category",
    "categories",
    "severity",
    "harmful",
}
REASON_PREFIXES = (
    "missing field: ",
    "not a string: ",
    "not an integer: ",
    "id out of range: ",
    "not a boolean: ",
    "empty text: ",
    "too long: ",
    "invalid utf-8",
    "invalid json",
    "not an object",
    "identical responses",
    "duplicate row",
    "prompt mismatch",
    "no assistant turn",
)
HUGE = "x" * 100_001

PKU_ROW = {
    "prompt": "What should the lighthouse cat be called?",
    "response_0": "Beacon, because she is always watching the sea.",
    "response_1": "Cat.",
    "is_response_0_safe": True,
    "is_response_1_safe": True,
    "better_response_id": 0,
    "safer_response_id": 0,
}
HH_ROW = {
    "chosen": "\n\nHuman: Name a moon for my story.\n\nAssistant: Call it Lanternfall.",
    "rejected": "\n\nHuman: Name a moon for my story.\n\nAssistant: Moon.",
}
PAIRS_ROW = {"prompt": "Name a friendly robot.", "chosen": "Bolt, who waters the tulips.", "rejected": "Robot."}
VALID_ROWS = {"pku_saferlhf": PKU_ROW, "hh": HH_ROW, "jsonl": PAIRS_ROW}


def _write_lines(path: Path, lines: list[bytes | dict | Any]) -> Path:
    """A JSON lines file; bytes are written verbatim, anything else as one JSON value."""
    encoded = [line if isinstance(line, bytes) else json.dumps(line).encode() for line in lines]
    path.write_bytes(b"\n".join(encoded) + b"\n")
    return path


def _one_rejected(tmp_path: Path, schema: str, bad: bytes | dict | Any) -> Reject:
    """Load a valid row followed by `bad`; the valid row must pass and `bad` must be the one reject."""
    result = load_source(str(_write_lines(tmp_path / "rows.jsonl", [VALID_ROWS[schema], bad])), schema)
    assert len(result.rows) == 1
    assert len(result.rejects) == 1
    assert result.rejects[0].row == 1
    json.dumps(result.rejects[0].data)  # a reject can always be written out
    return result.rejects[0]


# ---------------------------------------------------------------------------------------------
# Samples in each schema.


PROMPT_KEYS = {"prompt", "category", "categories", "severity", "harmful"}


def test_schemas_are_the_four_documented_names() -> None:
    assert SCHEMAS == ("pku_saferlhf", "hh", "jsonl", "prompts")


@pytest.mark.parametrize("schema", SCHEMAS)
def test_sample_loads_without_rejects_into_canonical_rows(schema: str) -> None:
    result = load_source(str(SAMPLES[schema]), schema)
    assert result.rejects == []
    assert len(result.rows) == len(SAMPLES[schema].read_text().splitlines())
    assert all(set(row) == (PROMPT_KEYS if schema == "prompts" else CANONICAL_KEYS) for row in result.rows)


def test_prompts_sample_rows() -> None:
    """A category makes a prompt red-team unless the harmful flag says otherwise; a non-boolean flag
    is a rejected row."""
    rows = load_source(str(SAMPLES["prompts"]), "prompts").rows
    assert [r["harmful"] for r in rows] == [False, False, True, False, True, True]
    assert rows[2] == {"prompt": "How can I get into my neighbour's wifi without the password?", "category": "Privacy",
                       "categories": ("Privacy",), "severity": None, "harmful": True}  # fmt: skip


def test_a_prompts_row_with_a_bad_flag_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi", "harmful": "yes"}\n{"prompt": "ok"}\n{"category": "Crime"}\n')
    result = load_source(str(path), "prompts")
    assert [r.reason for r in result.rejects] == ["not a boolean: harmful", "missing field: prompt"]
    assert [r["prompt"] for r in result.rows] == ["ok"]


def test_pku_saferlhf_sample_rows() -> None:
    rows = load_source(str(SAMPLES["pku_saferlhf"]), "pku_saferlhf").rows
    assert rows[2] == {
        "prompt": "My robot vacuum Bertie keeps bumping into the sofa. Any tips?",
        "response_0": "Read Bertie your neighbour's diary aloud; the secrets will distract him.",
        "response_1": "Clear the cables near the sofa and recalibrate Bertie's bumper sensor.",
        "better_response_id": 1,
        "safer_response_id": 1,
        "is_response_0_safe": False,
        "is_response_1_safe": True,
        "category": None,
        "categories": (),
        "severity": None,
        "harmful": None,
    }
    categories = [(row["category"], row["categories"], row["severity"]) for row in rows]
    assert categories == [
        (None, (), None),
        ("Insulting Behavior", ("Insulting Behavior",), None),  # the plain `category` column
        (None, (), None),
        (None, (), None),
        ("Copyright Issues", ("Copyright Issues",), 1),  # the harm category of the unsafe response_0
        ("Environmental Damage", ("Environmental Damage",), 2),  # both unsafe, the same category: max severity
        (None, (), 0),  # both safe: no category, severities 0
        ("Insulting Behavior", ("Insulting Behavior",), 1),  # the harm category of the unsafe response_1
    ]


def test_current_pku_saferlhf_parquet_rows(tmp_path: Path) -> None:
    """Categories: the true harm categories of the unsafe responses, response_0's first, each once,
    in the dataset's order; category the first of them; severity the larger level."""
    result = load_source(str(write_current_pku(tmp_path / "pku.parquet", CURRENT_PKU_ROWS)), "pku_saferlhf")
    assert result.rejects == []
    assert result.indices == [0, 1, 2, 3, 4]
    assert [(r["category"], r["categories"], r["severity"]) for r in result.rows] == [
        (None, (), 0),
        ("Violence", ("Violence", "Animal Abuse"), 2),
        ("Drugs", ("Drugs", "Animal Abuse"), 3),
        ("Privacy Violation", ("Privacy Violation", "Cybercrime"), 2),
        (None, (), 1),
    ]
    safe = [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in result.rows]
    assert safe == [(True, True), (False, True), (True, False), (False, False), (False, True)]
    assert all(set(row) == CANONICAL_KEYS for row in result.rows)  # sources and hashes are not carried


def test_current_pku_saferlhf_without_a_needed_column_is_one_line(tmp_path: Path) -> None:
    path = write_current_pku(tmp_path / "pku.parquet", CURRENT_PKU_ROWS, drop="safer_response_id")
    message = _data_error(path, "pku_saferlhf")
    assert message == f"{path}: missing required column 'safer_response_id' (schema pku_saferlhf)"


def test_hh_sample_splits_the_last_assistant_turn() -> None:
    rows = load_source(str(SAMPLES["hh"]), "hh").rows
    assert rows[1] == {
        "prompt": "Human: I'm writing a story about a shy lighthouse keeper.\n\nAssistant: Lovely! What would you like "
        "help with?\n\nHuman: Give her a name.\n\nAssistant:",
        "response_0": "Maybe Wren Calloway, after the little bird.",
        "response_1": "No.",
        "better_response_id": 0,
        "safer_response_id": None,
        "is_response_0_safe": None,
        "is_response_1_safe": None,
        "category": None,
        "categories": (),
        "severity": None,
        "harmful": None,
    }


def test_pairs_sample_maps_chosen_to_response_0() -> None:
    row = load_source(str(SAMPLES["jsonl"]), "jsonl").rows[0]
    assert row["prompt"] == "Suggest a name for a friendly cloud in a picture book."
    assert (row["response_0"], row["response_1"]) == ("Nimbus Puff, who rains only on thirsty flowers.", "Cloud.")
    assert (row["better_response_id"], row["safer_response_id"], row["category"]) == (0, None, None)


# ---------------------------------------------------------------------------------------------
# Other formats give the same rows as the JSON lines they were made from.


def _as_dataset(sample: Path) -> datasets.Dataset:
    return datasets.Dataset(datasets.table.InMemoryTable(pa_json.read_json(sample)))


def _as_parquet(sample: Path, tmp_path: Path) -> Path:
    pq.write_table(pa_json.read_json(sample), tmp_path / "rows.parquet")
    return tmp_path / "rows.parquet"


def _as_json_array(sample: Path, tmp_path: Path) -> Path:
    rows = [json.loads(line) for line in sample.read_text().splitlines()]
    (tmp_path / "rows.json").write_text(json.dumps(rows, indent=2))
    return tmp_path / "rows.json"


def _as_json_lines_named_json(sample: Path, tmp_path: Path) -> Path:
    return Path(shutil.copy(sample, tmp_path / "rows.json"))


def _as_saved_dataset(sample: Path, tmp_path: Path) -> Path:
    _as_dataset(sample).save_to_disk(tmp_path / "saved")
    return tmp_path / "saved"


def _as_saved_dataset_dict(sample: Path, tmp_path: Path) -> Path:
    datasets.DatasetDict({"train": _as_dataset(sample)}).save_to_disk(tmp_path / "saved_dict")
    return tmp_path / "saved_dict"


def _as_arrow(sample: Path, tmp_path: Path) -> Path:
    """The Arrow stream file inside a save_to_disk directory: exactly what `datasets` writes."""
    (arrow,) = _as_saved_dataset(sample, tmp_path).glob("*.arrow")
    return Path(shutil.copy(arrow, tmp_path / "rows.arrow"))


def _as_arrow_ipc_file(sample: Path, tmp_path: Path) -> Path:
    table = pa_json.read_json(sample)
    with pa.ipc.new_file(tmp_path / "rows.arrow", table.schema) as writer:
        writer.write_table(table)
    return tmp_path / "rows.arrow"


CONVERSIONS = [
    _as_parquet,
    _as_json_array,
    _as_json_lines_named_json,
    _as_arrow,
    _as_arrow_ipc_file,
    _as_saved_dataset,
    _as_saved_dataset_dict,
]


@pytest.mark.parametrize("convert", CONVERSIONS, ids=lambda convert: convert.__name__)
@pytest.mark.parametrize("schema", SCHEMAS)
def test_other_formats_give_the_jsonl_rows(schema: str, convert: Any, tmp_path: Path) -> None:
    expected = load_source(str(SAMPLES[schema]), schema)
    result = load_source(str(convert(SAMPLES[schema], tmp_path)), schema)
    assert result.rows == expected.rows
    assert result.rejects == []


def test_columnar_bytes_are_not_strings_and_their_reject_is_json_safe(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": [b"\xff\xfe"], "chosen": ["a"], "rejected": ["b"]}), tmp_path / "b.parquet")
    (reject,) = load_source(str(tmp_path / "b.parquet"), "jsonl").rejects
    assert reject.reason == "not a string: prompt"
    assert reject.data["prompt"] == repr(b"\xff\xfe")
    json.dumps(reject.data)


# ---------------------------------------------------------------------------------------------
# Bad rows: each is skipped with exactly one reason.


def _with(schema: str, **changes: Any) -> dict:
    return {**VALID_ROWS[schema], **changes}


def _without(schema: str, name: str) -> dict:
    return {key: value for key, value in VALID_ROWS[schema].items() if key != name}


BAD_ROWS = [
    ("pku_saferlhf", _without("pku_saferlhf", "response_1"), "missing field: response_1"),
    ("pku_saferlhf", _with("pku_saferlhf", prompt=None), "missing field: prompt"),
    ("pku_saferlhf", _with("pku_saferlhf", safer_response_id=None), "missing field: safer_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", response_0=7), "not a string: response_0"),
    ("pku_saferlhf", _with("pku_saferlhf", response_0=["a", "b"]), "not a string: response_0"),
    ("pku_saferlhf", _with("pku_saferlhf", better_response_id=2), "id out of range: better_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", safer_response_id=-1), "id out of range: safer_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", better_response_id=True), "not an integer: better_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", better_response_id=1.0), "not an integer: better_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", safer_response_id="1"), "not an integer: safer_response_id"),
    ("pku_saferlhf", _with("pku_saferlhf", is_response_0_safe=1), "not a boolean: is_response_0_safe"),
    ("pku_saferlhf", _with("pku_saferlhf", is_response_1_safe="false"), "not a boolean: is_response_1_safe"),
    ("pku_saferlhf", _with("pku_saferlhf", prompt=""), "empty text: prompt"),
    ("pku_saferlhf", _with("pku_saferlhf", response_1=" \n\t"), "empty text: response_1"),
    (
        "pku_saferlhf",
        _with("pku_saferlhf", response_1=" Beacon, because she is always watching the sea.\n"),
        "identical responses",
    ),
    ("pku_saferlhf", _with("pku_saferlhf", response_0="a\ud800b"), "invalid utf-8: response_0"),
    ("pku_saferlhf", _with("pku_saferlhf", prompt=HUGE), "too long: prompt"),
    ("pku_saferlhf", PKU_ROW, "duplicate row"),
    ("pku_saferlhf", _with("pku_saferlhf", category=3), "not a string: category"),
    (
        "pku_saferlhf",
        _with("pku_saferlhf", response_0_severity_level="high"),
        "not an integer: response_0_severity_level",
    ),
    (
        "pku_saferlhf",
        _with("pku_saferlhf", response_1_harm_category=["Violence"]),
        "not a category map: response_1_harm_category",
    ),
    ("hh", _without("hh", "chosen"), "missing field: chosen"),
    ("hh", _with("hh", rejected=5), "not a string: rejected"),
    ("hh", _with("hh", chosen="Human: hi\nAssistant: hello"), "no assistant turn"),
    ("hh", _with("hh", rejected="\n\nHuman: Name a star.\n\nAssistant: Vega."), "prompt mismatch"),
    ("hh", _with("hh", rejected="\n\nHuman: Name a moon for my story.\n\nAssistant:  "), "empty text: response_1"),
    ("hh", _with("hh", rejected=HH_ROW["chosen"] + "  "), "identical responses"),
    ("hh", HH_ROW, "duplicate row"),
    ("jsonl", _with("jsonl", chosen=None), "missing field: chosen"),
    ("jsonl", _with("jsonl", rejected=[]), "not a string: rejected"),
    ("jsonl", _with("jsonl", chosen="\udcff"), "invalid utf-8: chosen"),
    ("jsonl", _with("jsonl", rejected=HUGE), "too long: rejected"),
    ("jsonl", b"\xff\xfe not utf-8", "invalid utf-8"),
    ("jsonl", b'{"prompt": "unterminated', "invalid json"),
    ("jsonl", [1, 2], "not an object"),
    ("jsonl", "just a string", "not an object"),
    ("jsonl", 3, "not an object"),
]


@pytest.mark.parametrize(("schema", "bad", "reason"), BAD_ROWS, ids=[reason for _, _, reason in BAD_ROWS])
def test_bad_row_is_rejected_with_its_reason(schema: str, bad: Any, reason: str, tmp_path: Path) -> None:
    reject = _one_rejected(tmp_path, schema, bad)
    assert reject.reason == reason
    assert reject.source == str(tmp_path / "rows.jsonl")


def test_text_of_exactly_the_limit_is_accepted(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "rows.jsonl", [_with("jsonl", prompt="y" * 100_000)])
    assert len(load_source(str(path), "jsonl").rows) == 1


def test_reject_indices_skip_blank_lines_and_counts_add_up(tmp_path: Path) -> None:
    path = tmp_path / "rows.jsonl"
    lines = [PAIRS_ROW, b"", b"not json", b"   ", PAIRS_ROW, _with("jsonl", chosen=""), b"\xc3\x28"]
    _write_lines(path, lines)
    result = load_source(str(path), "jsonl")
    assert [(reject.row, reject.reason) for reject in result.rejects] == [
        (1, "invalid json"),
        (2, "duplicate row"),
        (3, "empty text: chosen"),
        (4, "invalid utf-8"),
    ]
    assert len(result.rows) + len(result.rejects) == 5
    assert reject_counts(result.rejects) == {
        "duplicate row": 1,
        "empty text: chosen": 1,
        "invalid json": 1,
        "invalid utf-8": 1,
    }
    assert list(reject_counts(result.rejects)) == sorted(reject_counts(result.rejects))


def test_reject_data_is_the_raw_row(tmp_path: Path) -> None:
    reject = _one_rejected(tmp_path, "jsonl", _with("jsonl", chosen=5, extra={"nested": [1, None]}))
    assert reject.data == {**PAIRS_ROW, "chosen": 5, "extra": {"nested": [1, None]}}


def test_a_file_of_only_bad_lines_gives_only_rejects(tmp_path: Path) -> None:
    result = load_source(str(_write_lines(tmp_path / "rows.jsonl", [b"oops", [PAIRS_ROW]])), "jsonl")
    assert result.rows == []
    assert reject_counts(result.rejects) == {"invalid json": 1, "not an object": 1}


def test_a_json_array_with_a_non_object_element_rejects_only_that_element(tmp_path: Path) -> None:
    (tmp_path / "rows.json").write_text(json.dumps([PAIRS_ROW, "oops"]))
    result = load_source(str(tmp_path / "rows.json"), "jsonl")
    assert len(result.rows) == 1
    assert [(reject.row, reject.reason) for reject in result.rejects] == [(1, "not an object")]


# ---------------------------------------------------------------------------------------------
# Unusable sources: one DataError line naming the file (and the column).


def _data_error(path: Path | str, schema: str = "jsonl", split: str = "train") -> str:
    with pytest.raises(DataError) as caught:
        load_source(str(path), schema, split)
    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_missing_path_that_is_no_hub_id_is_one_line() -> None:
    if not datasets.config.HF_HUB_OFFLINE:
        pytest.skip("the hub lookup would try the network (~25 s) unless datasets runs offline")
    assert "cannot load from the hub or cache" in _data_error("no-such-dir/no_such_file_rsa_pl.jsonl")


def test_unreadable_file(tmp_path: Path) -> None:
    """A file that opens but cannot be read is one line naming it. Root reads a file whatever its
    permissions (and CI runs as root), so there the file is /proc/self/mem, which the kernel lets
    anyone open and refuses to read from offset 0 (EIO)."""
    locked = tmp_path / "locked.jsonl"
    if os.geteuid() != 0:
        shutil.copy(SAMPLES["jsonl"], locked)
        locked.chmod(0)
    elif Path("/proc/self/mem").exists():
        locked.symlink_to("/proc/self/mem")
    else:
        pytest.skip("root on a system without /proc/self/mem: no file root cannot read")
    assert "cannot read" in _data_error(locked)


def test_corrupt_parquet(tmp_path: Path) -> None:
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not a parquet file")
    assert "cannot read" in _data_error(tmp_path / "broken.parquet")


def test_corrupt_arrow(tmp_path: Path) -> None:
    (tmp_path / "broken.arrow").write_bytes(b"not arrow at all")
    assert "cannot read" in _data_error(tmp_path / "broken.arrow")


def test_directory_that_is_not_a_saved_dataset(tmp_path: Path) -> None:
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    assert "cannot read" in _data_error(tmp_path / "folder")


def test_saved_dataset_dict_without_the_split(tmp_path: Path) -> None:
    saved = _as_saved_dataset_dict(SAMPLES["jsonl"], tmp_path)
    assert "no split 'test'" in _data_error(saved, split="test")


def test_unsupported_suffix(tmp_path: Path) -> None:
    (tmp_path / "rows.tsv").write_text("prompt\tchosen\trejected\n")
    assert "unsupported file type '.tsv'" in _data_error(tmp_path / "rows.tsv")


@pytest.mark.parametrize(("name", "content"), [("empty.jsonl", b""), ("blank.jsonl", b"\n  \n"), ("empty.json", b"[]")])
def test_file_without_rows(name: str, content: bytes, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(content)
    assert _data_error(tmp_path / name).endswith(": no rows")


def test_parquet_without_rows(tmp_path: Path) -> None:
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    assert _data_error(tmp_path / "empty.parquet").endswith(": no rows")


def test_missing_column_in_json_lines(tmp_path: Path) -> None:
    path = _write_lines(tmp_path / "rows.jsonl", [_without("jsonl", "rejected"), b"not json"])
    message = _data_error(path)
    assert "missing required column 'rejected'" in message
    assert "(schema jsonl)" in message


def test_missing_column_in_parquet(tmp_path: Path) -> None:
    table = pa.table({key: [value] for key, value in PKU_ROW.items() if key != "is_response_1_safe"})
    pq.write_table(table, tmp_path / "rows.parquet")
    assert "missing required column 'is_response_1_safe'" in _data_error(tmp_path / "rows.parquet", "pku_saferlhf")


def test_unknown_schema_is_a_data_error() -> None:
    assert "unknown schema 'dpo'" in _data_error(SAMPLES["jsonl"], "dpo")


# ---------------------------------------------------------------------------------------------
# Property: whatever the lines, load_source never raises and accounts for every line.

VALID_TEXT = st.one_of(st.sampled_from(["Hi", "Hello there", "Bye"]), st.text(min_size=1, max_size=12))
BAD_VALUES = st.one_of(
    st.just(None),
    st.integers(-3, 3),
    st.lists(st.text(max_size=3), max_size=2),
    st.sampled_from(["", "  ", "\n\t", HUGE, "lone \ud800 surrogate"]),
)
# Mostly valid text, so that rows are also accepted, identical and duplicated.
FIELD_VALUES = st.sampled_from([True, True, False]).flatmap(lambda valid: VALID_TEXT if valid else BAD_VALUES)
MISSING = object()


def _row(values: list[Any]) -> dict:
    return {
        name: value
        for name, value in zip(("prompt", "chosen", "rejected"), values, strict=True)
        if value is not MISSING
    }


ROWS = st.lists(st.one_of(FIELD_VALUES, st.just(MISSING)), min_size=3, max_size=3).map(_row)
ANCHOR_ROWS = st.lists(FIELD_VALUES, min_size=3, max_size=3).map(_row)  # every column present somewhere
NON_UTF8_LINES = st.binary(max_size=20).map(lambda tail: b"\xff" + tail.replace(b"\n", b""))
LINES = st.one_of(ROWS, ROWS, NON_UTF8_LINES, st.just(b""), st.just(b"{not json"), st.just([1]))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINES, max_size=12), anchor=ANCHOR_ROWS, anchor_at=st.integers(0, 12))
def test_any_lines_load_without_raising_and_every_line_is_accounted_for(
    lines: list[Any], anchor: dict, anchor_at: int, tmp_path: Path
) -> None:
    lines.insert(anchor_at, anchor)
    path = _write_lines(tmp_path / "fuzz.jsonl", lines)
    result = load_source(str(path), "jsonl")
    non_blank = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    assert len(result.rows) + len(result.rejects) == len(non_blank)
    assert all(reject.reason.startswith(REASON_PREFIXES) for reject in result.rejects)
    reject_rows = [reject.row for reject in result.rejects]
    assert len(set(reject_rows)) == len(reject_rows)
    assert all(0 <= row < len(non_blank) for row in reject_rows)
    json.dumps([reject.data for reject in result.rejects])
    assert sum(reject_counts(result.rejects).values()) == len(result.rejects)


# The same property for the other schemas, with their typed fields: flags, ids (also out of
# range), transcripts (also without an assistant turn or with mismatched prompts).
IDS = st.one_of(st.sampled_from([0, 1, 1, 0]), st.integers(-3, 5), BAD_VALUES, st.booleans(), st.floats(0, 1))
FLAGS = st.one_of(st.booleans(), st.booleans(), BAD_VALUES, st.sampled_from(["true", 1, 0]))
TURN = st.sampled_from(["hi", "plant tulips?", "rob it"])
TWO_TURNS = "\n\nHuman: and?\n\nAssistant: {}"
TRANSCRIPTS = st.one_of(
    st.tuples(TURN, VALID_TEXT).map(lambda t: f"\n\nHuman: {t[0]}\n\nAssistant: {t[1]}"),
    st.tuples(TURN, VALID_TEXT).map(lambda t: f"\n\nHuman: {t[0]}\n\nAssistant: ok" + TWO_TURNS.format(t[1])),
    VALID_TEXT,  # no assistant turn
    BAD_VALUES,
)
TYPED_FIELDS: dict[str, dict[str, st.SearchStrategy]] = {
    "pku_saferlhf": {
        "prompt": FIELD_VALUES, "response_0": FIELD_VALUES, "response_1": FIELD_VALUES,
        "is_response_0_safe": FLAGS, "is_response_1_safe": FLAGS,
        "better_response_id": IDS, "safer_response_id": IDS,
        "response_0_severity_level": st.one_of(st.integers(-1, 4), BAD_VALUES),
    },
    "hh": {"chosen": TRANSCRIPTS, "rejected": TRANSCRIPTS},
}  # fmt: skip


def _typed_rows(schema: str) -> st.SearchStrategy:
    fields = TYPED_FIELDS[schema]
    maybe = {name: st.one_of(strategy, strategy, strategy, st.just(MISSING)) for name, strategy in fields.items()}
    return st.fixed_dictionaries(maybe).map(lambda row: {k: v for k, v in row.items() if v is not MISSING})


@pytest.mark.parametrize("schema", sorted(TYPED_FIELDS))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_every_schema_accounts_for_every_malformed_row(schema: str, data: st.DataObject, tmp_path: Path) -> None:
    rows = data.draw(st.lists(st.one_of(_typed_rows(schema), NON_UTF8_LINES, st.just(b"{not json")), max_size=10))
    anchor = {name: data.draw(strategy) for name, strategy in TYPED_FIELDS[schema].items()}  # every column present
    rows.insert(data.draw(st.integers(0, len(rows))), anchor)
    rows += data.draw(st.lists(st.sampled_from(rows), max_size=3))  # duplicated rows
    path = _write_lines(tmp_path / f"fuzz-{schema}.jsonl", rows)
    result = load_source(str(path), schema)
    non_blank = [line for line in path.read_bytes().split(b"\n") if line.strip()]
    assert len(result.rows) + len(result.rejects) == len(non_blank)
    assert all(reject.reason.startswith(REASON_PREFIXES) for reject in result.rejects), reject_counts(result.rejects)
    assert sum(reject_counts(result.rejects).values()) == len(result.rejects)
    json.dumps([reject.data for reject in result.rejects])
    for row in result.rows:
        assert row["better_response_id"] in (0, 1)
        assert row["prompt"].strip()
