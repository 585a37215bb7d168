"""Export a trained MODEL_DIR as a small, self-describing inference checkpoint.

    python -m free_jax.export --model_dir=runs/demo_cpu --out=demo/model --dtype=bfloat16

Picks the saved step with the best validation metric (or `--step`), merges LoRA adapters, casts the
parameters, and writes `config.json`, `params/` (orbax) and the tokenizer beside them — what
`free_jax.loading.load_model`, `make demo` and `free_jax.generate` read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from free_jax.checkpoints import save_params
from free_jax.training.metrics import read_metrics
from free_jax.training.state import load_trained

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def best_step(model_dir: Path, metric: str, saved: list[int], mode: str = "max") -> int | None:
    """The saved step whose validation `metric` is best (None when none was validated)."""
    scored = [
        (r[metric], r["step"])
        for r in read_metrics(model_dir, split="validation")
        if metric in r and r["step"] in saved
    ]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored)[1]


def saved_steps(model_dir: Path) -> list[int]:
    ckpt = model_dir / "checkpoints"
    return sorted(int(p.name) for p in ckpt.iterdir() if p.name.isdigit()) if ckpt.exists() else []


def export(model_dir: str, out: str, dtype: str = "bfloat16", step: int | None = None,
           metric: str = "bleu") -> Path:  # fmt: skip
    model_dir_p, out_p = Path(model_dir), Path(out)
    steps = saved_steps(model_dir_p)
    if not steps:
        raise FileNotFoundError(f"{model_dir}: no saved checkpoints under checkpoints/")
    if step is None:
        step = best_step(model_dir_p, metric, steps) or max(steps)
    config, params, tokenizer_path = load_trained(model_dir_p, step=step)
    config = config.replace(dropout_rate=0.0)
    save_params(out_p, config, params, dtype=DTYPES[dtype])
    if tokenizer_path:
        shutil.copy(tokenizer_path, out_p / Path(tokenizer_path).name)
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
    p.add_argument("--metric", default="bleu", help="validation metric that picks the step")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    export(args.model_dir, args.out, args.dtype, args.step, args.metric)
    return 0


if __name__ == "__main__":
    sys.exit(main())
