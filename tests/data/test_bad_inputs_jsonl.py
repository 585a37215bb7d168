"""Issue 19, JSONL: a field that is not text and a line that is not UTF-8 are malformed lines (an
error naming file and line, or skipped and counted under skip_malformed), never text like "True"."""

import json

import pytest

from free_jax.data import tasks as tasks_lib
from free_jax.data.jsonl import JsonlError, read_jsonl

GOOD = json.dumps({"document": "Der Hund bellt.", "summary": "Hund."})


def _write(path, lines: list[bytes | str]) -> str:
    path.write_bytes(b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines))
    return str(path)


@pytest.mark.parametrize(
    "record, message",
    [
        ({"document": {"a": 1}, "summary": "s"}, "field 'document' is a JSON object"),
        ({"document": "d", "summary": True}, "field 'summary' is a JSON boolean"),
        ({"document": 7, "summary": "s"}, "field 'document' is a JSON number"),
        ({"document": ["a", "b"], "summary": "s"}, "field 'document' is a JSON list"),
        (
            {"document": "d", "summary": ["ok", 3]},
            "field 'summary' is a list holding a JSON number",
        ),
        ({"document": "d", "summary": []}, "field 'summary' is an empty list"),
    ],
)
def test_a_field_that_is_not_text_names_file_line_and_field(tmp_path, record, message):
    path = _write(tmp_path / "d.jsonl", [GOOD, json.dumps(record)])
    with pytest.raises(JsonlError, match=rf"d\.jsonl:2: {message}"):
        read_jsonl(path, input_field="document", target_field="summary")


def test_a_target_may_be_a_list_of_strings(tmp_path):
    record = {"document": "d", "summary": ["first", "second"]}
    path = _write(tmp_path / "d.jsonl", [json.dumps(record)])
    source = read_jsonl(path, input_field="document", target_field="summary")
    task = tasks_lib.jsonl_task("t", train_file=path, input_field="document",
                                target_field="summary")  # fmt: skip
    assert task.target_text(source[0]) == "first"


def test_a_line_that_is_not_utf8_names_file_and_line(tmp_path):
    path = _write(
        tmp_path / "latin1.jsonl", [GOOD, '{"document": "Größe", "summary": "s"}'.encode("latin-1")]
    )
    with pytest.raises(JsonlError, match=r"latin1\.jsonl:2: not UTF-8"):
        read_jsonl(path, input_field="document", target_field="summary")


def test_skip_malformed_skips_and_counts_both(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl",
        [
            GOOD,
            json.dumps({"document": {"a": 1}, "summary": True}),
            b'{"document": "\xff\xfe", "summary": "s"}',
            json.dumps({"document": "Zwei", "summary": "2"}),
        ],
    )
    source = read_jsonl(path, input_field="document", target_field="summary",
                        skip_malformed=True)  # fmt: skip
    assert [r["document"] for r in source] == ["Der Hund bellt.", "Zwei"]
    assert source.line_numbers == [1, 4]
    assert (source.num_malformed, source.num_missing_field) == (2, 0)


def test_the_task_loader_rejects_them_too(tmp_path):
    path = _write(tmp_path / "train.jsonl", [json.dumps({"document": "d", "summary": True})])
    task = tasks_lib.jsonl_task("t", train_file=path, input_field="document",
                                target_field="summary")  # fmt: skip
    with pytest.raises(JsonlError, match=r"train\.jsonl:1: field 'summary'"):
        tasks_lib.load_source(task, "train")
