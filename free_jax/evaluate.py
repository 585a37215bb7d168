"""Evaluation entry point: every decoder on a task's split, quality and speed side by side.

    python -m free_jax.evaluate --gin_file=gin_configs/runs/evaluate.gin \\
        [--gin.CHECKPOINT=\\"path\\"] [--gin.NUM_EXAMPLES=200] [--gin.evaluate.threshold_file=...]
        [--gin.FreeSpec.window=16] [--gin.CalmSpec.min_exit=2] [--gin.FreeSpec.measure=...]

Writes results.json, results.md and pareto.png (plus calibration.png for the adaptive threshold)
under OUT_DIR (default CHECKPOINT/eval) and prints the table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import gin

from free_jax import gin_configurables  # noqa: F401  (registers the specs evaluate.gin binds)
from free_jax.calibration import load_threshold, plot_calibration
from free_jax.calibration.per_exit import FORMAT as PER_EXIT_FORMAT
from free_jax.calibration.per_exit import load_exit_thresholds
from free_jax.data import get_task
from free_jax.evaluation import EvalSettings, SuiteSpec, run_suite, write_report
from free_jax.evaluation.report import markdown_table
from free_jax.evaluation.runner import split_batches
from free_jax.evaluation.suite import device_name
from free_jax.loading import (
    describe_config,
    load_confidence_head,
    load_model_and_tokenizer,
    with_exit_heads,
)
from free_jax.train import parse_flags, parse_gin


def with_threshold_file(suite: SuiteSpec, path: str) -> SuiteSpec:
    """The suite with calibrate's output: threshold.json (FREE's calibrated row) or
    exit_thresholds.json (the exit-head rows); a Learn-then-Test file adds its guarantee."""
    text = Path(path).read_text(encoding="utf-8")
    if PER_EXIT_FORMAT in text:
        multi = load_exit_thresholds(path)
        levels = (multi.epsilon, multi.delta) if multi.epsilon is not None else None
        return dataclasses.replace(
            suite, exits=multi.exits, exit_thresholds=multi.thresholds, exit_guarantee=levels
        )
    calibrated = load_threshold(path)
    levels = None
    if calibrated.estimator == "ltt" and not calibrated.never_exit:
        levels = (calibrated.epsilon, calibrated.delta)
    return dataclasses.replace(
        suite, calibrated_threshold=calibrated.threshold, calibrated_guarantee=levels
    )


@gin.configurable(module="free_jax")
def evaluate(
    checkpoint: str = gin.REQUIRED,
    task: str = gin.REQUIRED,
    split: str = "test",
    data_dir: str | None = None,
    num_examples: int | None = None,
    max_input_length: int = 64,
    tokenizer: str | None = None,
    threshold_file: str | None = None,
    out_dir: str | None = None,
    settings: EvalSettings | None = None,
    suite: SuiteSpec | None = None,
    confidence_head: str | None = None,
    exit_heads: str | None = None,
    progress: bool = True,
) -> dict:
    """Loads the model, runs the suite, writes the report; returns {"records", "paths", ...}.

    `suite` holds every decoder's spec (`SuiteSpec.free`, `.calm`, `.static`); `confidence_head`
    is a file from `loading.save_confidence_head`, read by specs whose measure is "learned";
    `exit_heads` an exit-heads run's directory or exit_heads.msgpack (every decoder then reads the
    trained head at each exit layer that has one; `threshold_file` may then be calibrate's
    exit_thresholds.json, which adds the multi-exit rows).
    """
    settings = settings or EvalSettings()
    suite = suite or SuiteSpec()
    config, params, tok = load_model_and_tokenizer(checkpoint, tokenizer, flag="evaluate.tokenizer")
    if exit_heads:
        config, params = with_exit_heads(config, params, exit_heads)
    head = load_confidence_head(confidence_head, config) if confidence_head else None
    task_obj = get_task(task)
    if threshold_file:
        suite = with_threshold_file(suite, threshold_file)
    batches = split_batches(
        task_obj, tok, split, data_dir=data_dir, batch_size=max(suite.batch_sizes),
        max_input_length=max_input_length, max_target_length=settings.max_decode_len,
        limit=num_examples, config=config,
    )  # fmt: skip
    n = sum(b.num_real for b in batches)
    print(f"{describe_config(config)}; {task}/{split}: {n} examples; device {device_name()}")
    records, extras = run_suite(
        config, params, batches, lambda ids: tok.decode(list(ids)), task_obj.metric, settings,
        suite, confidence_params=head, progress=progress,
    )  # fmt: skip
    out = Path(out_dir or Path(checkpoint) / "eval")
    header = (
        f"# {task} ({split}, {n} examples) — {describe_config(config)}\n\n"
        f"Device: {device_name()}. Speedups are wall-clock ratios to full greedy in the same run; "
        "compile time is excluded (see results.json)."
    )
    paths = write_report(records, out, header=header)
    if extras.get("records") is not None and extras.get("online") is not None:
        conf, agree = extras["records"]
        result = extras["online"].result
        if result is not None and len(conf):
            paths["calibration"] = plot_calibration(result, conf, agree, out / "calibration.png")
    predictions_path = out / "predictions.json"
    predictions_path.write_text(json.dumps(extras["predictions"], indent=1, ensure_ascii=False))
    paths["predictions"] = str(predictions_path)
    print(markdown_table(records, "main"))
    for name, path in paths.items():
        print(f"{name}: {path}")
    return {
        "records": records,
        "paths": paths,
        "lossless_equals_full": extras.get("lossless_equals_full"),
    }


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
    return evaluate()


if __name__ == "__main__":
    main()
