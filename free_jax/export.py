"""Export a trained MODEL_DIR as a small, self-describing inference checkpoint.

    python -m free_jax.export --model_dir=runs/demo_cpu --out=demo/model --dtype=bfloat16

Picks the saved step with the best validation metric (`--metric`, default the task's headline
"score", else "loss"; lower is better for loss/ce/kl names, higher for bleu/rouge/accuracy/score
ones, `--mode` says which for any other), or `--step`, merges LoRA adapters, casts the
parameters, and writes `config.json`, `params/` (orbax) and the tokenizer beside them — what
`free_jax.loading.load_model`, `make demo` and `free_jax.generate` read — plus
`learning_curve.png` (`training.curves`) when the run logged validation records.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from free_jax.checkpoints import save_params
from free_jax.checkpoints.naming import check_against_config, flatten
from free_jax.training.curves import plot_learning_curve
from free_jax.training.metrics import read_metrics
from free_jax.training.state import load_trained

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


# Validation metrics where lower is better (by name prefix); every other known name is better high.
_LOWER_IS_BETTER = ("loss", "ce", "kl", "loop_rate", "perplexity", "ppl")
_HIGHER_IS_BETTER = ("bleu", "rouge", "acc", "agree", "score", "em", "f1", "exact")


def metric_mode(metric: str) -> str | None:
    """The direction in which `metric` improves: "min" or "max"; None when the name does not say.

    >>> metric_mode("loss"), metric_mode("ce_layer4"), metric_mode("rougeLsum"), metric_mode("f1")
    ('min', 'min', 'max', 'max')
    >>> metric_mode("num_examples") is None
    True
    """
    name = metric.lower()
    if name.startswith(_LOWER_IS_BETTER):
        return "min"
    if name.startswith(_HIGHER_IS_BETTER):
        return "max"
    return None


def best_step(
    model_dir: Path, metric: str | None, saved: list[int], mode: str | None = None
) -> int | None:
    """The saved step whose validation `metric` is best (None when no saved step was validated).

    Args:
      metric: a validation metric of metrics.jsonl; None takes "score" (the task's headline
        number) when recorded, else "loss".
      mode: "min" or "max"; None takes the metric's own direction (`metric_mode`).

    Raises:
      ValueError: `metric` is not among the validation metrics metrics.jsonl records (the message
        lists those), or its direction is unknown and no `mode` is given.
    """
    path = Path(model_dir) / "metrics.jsonl"
    records = read_metrics(model_dir, split="validation") if path.exists() else []
    recorded = sorted({k for r in records for k in r} - {"step", "split"})
    if metric is None:
        metric = next((m for m in ("score", "loss") if m in recorded), None)
        if metric is None:
            return None
    if metric not in recorded:
        raise ValueError(
            f"{path}: no validation metric {metric!r} is recorded; --metric must be one of "
            f"{recorded}"
        )
    mode = mode or metric_mode(metric)
    if mode not in ("min", "max"):
        raise ValueError(
            f"--metric={metric}: whether lower or higher is better is unknown; pass --mode=min "
            "or --mode=max"
        )
    sign = 1.0 if mode == "max" else -1.0
    scored = [
        (sign * float(r[metric]), r["step"]) for r in records if metric in r and r["step"] in saved
    ]
    # The best value; on a tie the later step, which has trained longer.
    return max(scored)[1] if scored else None


def saved_steps(model_dir: Path) -> list[int]:
    ckpt = model_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def export(model_dir: str, out: str, dtype: str = "bfloat16", step: int | None = None,
           metric: str | None = None, mode: str | None = None) -> Path:  # fmt: skip
    model_dir_p, out_p = Path(model_dir), Path(out)
    steps = saved_steps(model_dir_p)
    if not steps:
        raise FileNotFoundError(f"{model_dir}: no saved checkpoints under checkpoints/")
    if step is None:
        best = best_step(model_dir_p, metric, steps, mode)
        step = max(steps) if best is None else best
    config, params, tokenizer_path = load_trained(model_dir_p, step=step)
    # config.json and the checkpoint must describe one model (a restart under another config
    # once rewrote config.json): an export has to load back as the model it claims.
    check_against_config(flatten(params), config, f"{model_dir} step {step} (by its config.json)")
    config = config.replace(dropout_rate=0.0)
    save_params(out_p, config, params, dtype=DTYPES[dtype])
    if tokenizer_path:
        shutil.copy(tokenizer_path, out_p / Path(tokenizer_path).name)
    if read_metrics(model_dir_p, split="validation"):  # the model card's curve
        plot_learning_curve(model_dir_p, out_p / "learning_curve.png")
    size = sum(p.stat().st_size for p in out_p.rglob("*") if p.is_file())
    print(f"exported step {step} of {model_dir} ({dtype}, {size / 1e6:.1f} MB) to {out_p}")
    return out_p


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m free_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model_dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
    p.add_argument("--step", type=int, default=None, help="default: best validation step")
    p.add_argument(
        "--metric",
        default=None,
        help="validation metric that picks the step (default: score, else loss)",
    )
    p.add_argument("--mode", choices=("min", "max"), default=None,
                   help="whether the lowest or highest --metric is best (default: by its name: "
                        "loss/ce/kl minimise, bleu/rouge/accuracy/score maximise)")  # fmt: skip
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    export(args.model_dir, args.out, args.dtype, args.step, args.metric, args.mode)
    return 0


if __name__ == "__main__":
    sys.exit(main())
