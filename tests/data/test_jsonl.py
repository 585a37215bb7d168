import json

import numpy as np
import pytest

from free_jax.data.jsonl import JsonlError, get_field, read_jsonl


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_reads_records_in_order_with_custom_fields(tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [
            json.dumps({"doc": "Der Hund bellt.", "sum": "Hund."}),
            "",  # blank lines are not records and not errors
            json.dumps({"doc": "Zweiter", "sum": "2", "extra": 1}),
        ],
    )
    source = read_jsonl(path, input_field="doc", target_field="sum")
    assert len(source) == 2
    assert source[0] == {"doc": "Der Hund bellt.", "sum": "Hund."}
    assert source[1]["doc"] == "Zweiter"
    assert source.line_numbers == [1, 3]
    assert source.num_skipped == 0


def test_malformed_line_names_file_and_line(tmp_path):
    path = _write(tmp_path / "bad.jsonl", ['{"input": "a", "target": "b"}', '{"input": "a", '])
    with pytest.raises(JsonlError, match=r"bad\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_non_object_line_is_malformed(tmp_path):
    path = _write(tmp_path / "list.jsonl", ['["a", "b"]'])
    with pytest.raises(JsonlError, match=r"list\.jsonl:1: .*JSON object"):
        read_jsonl(path)


def test_missing_field_names_field_file_and_line(tmp_path):
    path = _write(
        tmp_path / "m.jsonl",
        ['{"input": "a", "target": "b"}', '{"input": "a"}', '{"input": "c", "target": null}'],
    )
    with pytest.raises(JsonlError, match=r"m\.jsonl:2: missing field 'target'"):
        read_jsonl(path)


def test_skip_malformed_counts_what_it_skips(tmp_path):
    path = _write(
        tmp_path / "mixed.jsonl",
        [
            '{"input": "a", "target": "b"}',
            "not json",
            '{"input": "a"}',
            "[1]",
            '{"input": "c", "target": "d"}',
        ],
    )
    source = read_jsonl(path, skip_malformed=True)
    assert [r["input"] for r in source] == ["a", "c"]
    assert source.line_numbers == [1, 5]
    assert (source.num_malformed, source.num_missing_field) == (2, 1)


def test_nested_field_paths(tmp_path):
    record = {"question": "q", "answers": {"text": ["Paris", "paris"]}}
    path = _write(tmp_path / "qa.jsonl", [json.dumps(record)])
    source = read_jsonl(path, input_field=["question"], target_field="answers/text/0")
    assert len(source) == 1
    assert get_field(record, "answers/text/1") == "paris"
    assert get_field({"a": np.array(["x", "y"])}, "a/-1") == "y"
    with pytest.raises(KeyError, match="answers/text/5"):
        get_field(record, "answers/text/5")
    assert get_field(record, "nope", "default") == "default"


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
