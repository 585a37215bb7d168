"""The learning curve of a run: the model card's table and plot from metrics.jsonl."""

import json

import pytest

from free_jax.training.curves import curve_table, plot_learning_curve


def _write(model_dir, records):
    (model_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_table_and_plot_from_metrics(tmp_path):
    _write(tmp_path, [
        {"step": 10, "split": "train", "loss": 5.0},
        {"step": 250, "split": "validation", "bleu": 2.9, "score": 2.9, "loss": 5.4,
         "acc_layer2": 0.22, "acc_layer8": 0.231},
        {"step": 500, "split": "validation", "bleu": 7.25, "score": 7.25, "loss": 4.1,
         "acc_layer2": 0.30, "acc_layer8": 0.35},
    ])  # fmt: skip
    table = curve_table(tmp_path).splitlines()
    assert table[0] == ("| step | score | layer 8 accuracy | layer 2 accuracy | validation loss |")
    assert table[2:] == [
        "| 250 | 2.90 | 23.1% | 22.0% | 5.400 |",
        "| 500 | 7.25 | 35.0% | 30.0% | 4.100 |",
    ]
    png = plot_learning_curve(tmp_path, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG" and png.endswith("curve.png")


def test_a_run_without_validation_says_which_file(tmp_path):
    _write(tmp_path, [{"step": 10, "split": "train", "loss": 5.0}])
    with pytest.raises(ValueError, match="metrics.jsonl has no validation records"):
        curve_table(tmp_path)
