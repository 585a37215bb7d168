"""Issue 19, export: `--metric` picks the best step in the metric's own direction, and a metric the
run never recorded is an error that lists the recorded ones (never a silent export of the latest)."""

import json

import pytest

from free_jax import export as export_entry
from free_jax.export import best_step, metric_mode


@pytest.fixture
def model_dir(tmp_path):
    """Checkpoints at steps 15 and 20; validation loss falls (4.014 -> 3.94), BLEU rises."""
    for step in (15, 20):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    records = [
        {"step": 15, "split": "train", "loss": 9.0},
        {"step": 15, "split": "validation", "loss": 4.014, "bleu": 11.0, "num_examples": 16},
        {"step": 20, "split": "validation", "loss": 3.94, "bleu": 10.0, "num_examples": 16},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return tmp_path


def test_loss_picks_the_lowest_and_bleu_the_highest(model_dir):
    assert best_step(model_dir, "loss", [15, 20]) == 20
    assert best_step(model_dir, "bleu", [15, 20]) == 15


def test_mode_overrides_the_direction(model_dir):
    assert best_step(model_dir, "loss", [15, 20], mode="max") == 15
    assert best_step(model_dir, "num_examples", [15, 20], mode="min") == 20  # a tie: the later


def test_unknown_metric_names_it_and_lists_the_recorded_ones(model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"'bleuu'.*\['bleu', 'loss', 'num_examples'\]"):
        export_entry.main([f"--model_dir={model_dir}", f"--out={tmp_path / 'out'}",
                           "--metric=bleuu"])  # fmt: skip
    assert not (tmp_path / "out").exists()


def test_a_metric_of_unknown_direction_needs_mode(model_dir):
    with pytest.raises(ValueError, match="--mode=min"):
        best_step(model_dir, "num_examples", [15, 20])


def test_default_metric_is_the_score_else_the_loss(model_dir):
    assert best_step(model_dir, None, [15, 20]) == 20  # no "score" recorded: the loss


def test_directions_of_the_metrics_the_trainer_records():
    lower = ["loss", "ce_layer4", "ce_deep", "kl_head2", "loop_rate"]
    higher = ["bleu", "score", "rouge1", "rougeLsum", "em", "f1", "acc_layer2", "agree_head1"]
    assert {metric_mode(m) for m in lower} == {"min"}
    assert {metric_mode(m) for m in higher} == {"max"}
