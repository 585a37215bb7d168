"""A run's learning curve from MODEL_DIR/metrics.jsonl: a plot and a markdown table (model cards).

plot_learning_curve("runs/demo_cpu", "demo/model/learning_curve.png")
print(curve_table("runs/demo_cpu"))   # | step | score | deep acc | shallow acc | val loss |
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from free_jax.training.metrics import read_metrics  # noqa: E402

__all__ = ["curve_table", "plot_learning_curve"]


def _validation(model_dir) -> list[dict]:
    rows = read_metrics(model_dir, split="validation")
    if not rows:
        raise ValueError(f"{Path(model_dir) / 'metrics.jsonl'} has no validation records")
    return rows


def _layers(row: dict) -> list[int]:
    return sorted(int(k[len("acc_layer") :]) for k in row if k.startswith("acc_layer"))


def curve_table(model_dir) -> str:
    """Markdown: per validation step the task score, the deepest and shallowest exits' token
    accuracy and the validation loss."""
    rows = _validation(model_dir)
    layers = _layers(rows[-1])
    deep, shallow = layers[-1], layers[0]
    lines = [
        f"| step | score | layer {deep} accuracy | layer {shallow} accuracy | validation loss |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        score = r.get("score", r.get("bleu"))
        lines.append(
            f"| {r['step']} | {'–' if score is None else f'{score:.2f}'} | "
            f"{100 * r[f'acc_layer{deep}']:.1f}% | {100 * r[f'acc_layer{shallow}']:.1f}% | "
            f"{r['loss']:.3f} |"
        )
    return "\n".join(lines)


def plot_learning_curve(model_dir, path) -> str:
    """Validation score and per-exit token accuracy against the step (left), training and
    validation loss (right); returns the path written."""
    rows = _validation(model_dir)
    train = read_metrics(model_dir, split="train")
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    steps = [r["step"] for r in rows]
    if any("score" in r for r in rows):
        left.plot(steps, [r.get("score", float("nan")) for r in rows], "k-o", ms=3, label="score")
    left.set_xlabel("step")
    left.set_ylabel("validation score (task metric)")
    acc = left.twinx()
    for layer in _layers(rows[-1]):
        acc.plot(steps, [100 * r[f"acc_layer{layer}"] for r in rows], alpha=0.6, lw=1,
                 label=f"layer {layer} acc")  # fmt: skip
    acc.set_ylabel("token accuracy (%)")
    acc.legend(fontsize=6, loc="lower right", ncol=2)
    right.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8, label="train loss")
    right.plot(steps, [r["loss"] for r in rows], "o-", ms=3, label="validation loss (deep CE)")
    right.set_xlabel("step")
    right.legend(fontsize=7)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.suptitle(f"learning curve of {Path(model_dir).name}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
