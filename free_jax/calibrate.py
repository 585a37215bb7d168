"""Offline calibration entry point: fit FREE's exit threshold on a calibration split.

    python -m free_jax.calibrate --gin_file=gin_configs/runs/calibrate.gin \\
        [--gin.CHECKPOINT=\\"path\\"] [--gin.calibrate.num_examples=300] \\
        [--gin.FreeSpec.measure=...] [--gin.ESTIMATOR=\\"ltt\\" --gin.EPSILON=0.05 --gin.DELTA=0.1]

Decodes the split with FREE (`calibrate.spec`, a `FreeSpec`: its shallow layer, window and measure
are the ones the threshold is for) at a threshold no token passes, so the deep layers verify every
position and each yields an unbiased (shallow confidence, shallow == deep) record; fits the chosen
estimator (a name in `calibration.ESTIMATORS`: "svi", "nuts", "moments" read ZETA, "ltt" EPSILON and
DELTA, "target_accuracy" TARGET); writes threshold.json (value, interval, estimator, counts, and for
"ltt" the tested grid's p-values) and calibration.png.

Two variants read records from one teacher-forced pass over the full model's greedy outputs
(`evaluation.exit_records`), where every position keeps its place:
* ESTIMATOR "ltt_sequence": Learn-then-Test on the share of outputs that differ from full greedy
  (`fit_ltt_sequence_threshold`), for FREE's S; writes threshold.json;
* `FreeSpec.exits` with more than one exit (exit heads): one threshold per exit with any estimator
  (`calibration.per_exit`; "ltt" certifies the cascade at EPSILON, DELTA by Bonferroni); writes
  exit_thresholds.json and calibration_exit<layer>.png per exit.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np

from free_jax import gin_configurables  # noqa: F401  (registers the specs calibrate.gin binds)
from free_jax.calibration import (
    NEVER_EXIT,
    fit_ltt_sequence_threshold,
    plot_calibration,
    resolve_estimator,
    save_threshold,
)
from free_jax.calibration.per_exit import fit_exit_thresholds, save_exit_thresholds
from free_jax.data import get_task
from free_jax.decoding.specs import FreeSpec, GreedySpec, exit_layer_of
from free_jax.evaluation import DecoderChoice, EvalSettings, run_decoder
from free_jax.evaluation.exit_records import exit_records, padded
from free_jax.evaluation.runner import split_batches
from free_jax.loading import (
    describe_config,
    load_confidence_head,
    load_model_and_tokenizer,
    with_exit_heads,
)
from free_jax.train import parse_flags, parse_gin

SEQUENCE = "ltt_sequence"  # the estimator name of the sequence-level Learn-then-Test


def collect_records(
    config, params, batches, settings: EvalSettings, spec: FreeSpec | None = None, *,
    confidence_params=None, progress=True,
):  # fmt: skip
    """(confidence, agree) of every decoded position, from the deep passes of FREE (`spec`)."""
    spec = FreeSpec() if spec is None else spec
    if not isinstance(spec, FreeSpec) or not spec.records:
        raise ValueError(
            f"calibrate.spec must be a FreeSpec that keeps its agreement records, got {spec!r}"
        )
    run = run_decoder(
        DecoderChoice("free (calibration)", spec, NEVER_EXIT), config, params, batches, settings,
        confidence_params=confidence_params, progress=progress,
    )  # fmt: skip
    return run.records_confidence, run.records_agree


def teacher_forced_records(
    config, params, batches, settings: EvalSettings, exits: tuple[int, ...], measure: str, *,
    confidence_params=None, progress=True,
):  # fmt: skip
    """Every exit's (confidence, agree) at every position of the full model's greedy outputs.

    Returns (confidence_EBN, agree_EBN, valid_BN) over all real examples, N = max_decode_len.
    """
    run = run_decoder(
        DecoderChoice("full (calibration)", GreedySpec()), config, params, batches, settings,
        progress=progress,
    )  # fmt: skip
    conf, agree, valid, done = [], [], [], 0
    for batch in batches:
        k = batch.num_real
        outputs_BN, valid_BN = padded(
            run.tokens[done : done + k], batch.encoder_tokens_BS.shape[0], settings.max_decode_len
        )
        done += k
        recs = exit_records(
            config, params, batch.encoder_tokens_BS, outputs_BN, exits=exits, measure=measure,
            prompt_lengths_B=batch.prompt_lengths_B, confidence_params=confidence_params,
        )  # fmt: skip
        conf.append(np.asarray(recs.confidence_EBN)[:, :k])
        agree.append(np.asarray(recs.token_EBN == recs.deep_BN[None])[:, :k])
        valid.append(valid_BN[:k])
    return np.concatenate(conf, 1), np.concatenate(agree, 1), np.concatenate(valid, 0)


@gin.configurable(module="free_jax")
def calibrate(
    checkpoint: str = gin.REQUIRED,
    task: str = gin.REQUIRED,
    split: str = "validation",
    data_dir: str | None = None,
    num_examples: int | None = 300,
    batch_size: int = 8,
    max_input_length: int = 64,
    tokenizer: str | None = None,
    estimator: str = "svi",
    zeta: float = 0.4,
    epsilon: float = 0.05,
    delta: float = 0.1,
    target: float = 0.95,
    out: str | None = None,
    settings: EvalSettings | None = None,
    spec: FreeSpec | None = None,
    confidence_head: str | None = None,
    exit_heads: str | None = None,
    progress: bool = True,
):
    """Decodes, fits and writes `threshold.json`; returns the `ThresholdResult`.

    `spec`: the FREE decoder whose threshold is fitted (None: `FreeSpec()`); `confidence_head`: a
    file from `loading.save_confidence_head`, for `FreeSpec.measure = 'learned'`. Each estimator
    reads its own levels: zeta ("svi", "nuts", "moments"), epsilon and delta ("ltt",
    "ltt_sequence"), target ("target_accuracy"). A `spec` with many `exits` fits one threshold per
    exit and returns an `ExitThresholds`.
    """
    settings = settings or EvalSettings()
    spec = FreeSpec() if spec is None else spec
    many = spec.exits is not None and len(spec.exits) > 1
    # Resolved first, so that an unknown name or a missing level fails before the decoding does.
    if estimator == SEQUENCE:
        if many:
            raise ValueError(
                f"estimator {SEQUENCE!r} fits FREE's one exit; FreeSpec.exits has many"
            )
        fit = lambda c, a, v: fit_ltt_sequence_threshold(c, a, v, epsilon=epsilon, delta=delta)
        for name, level in (("epsilon", epsilon), ("delta", delta)):
            if not (isinstance(level, int | float) and 0 < level < 1):
                raise ValueError(f"calibrate.{name} must be in (0, 1), got {level!r}")
    else:
        fit = resolve_estimator(
            estimator, zeta=zeta, epsilon=epsilon, delta=delta, target=target, seed=0
        )
    config, params, tok = load_model_and_tokenizer(
        checkpoint, tokenizer, flag="calibrate.tokenizer"
    )
    if exit_heads:
        config, params = with_exit_heads(config, params, exit_heads)
        if spec.exits is None and spec.shallow is None:  # every head is an exit
            spec = dataclasses.replace(spec, exits=config.head_layers)
            many = len(spec.exits) > 1
    if many and estimator == SEQUENCE:
        raise ValueError(f"estimator {SEQUENCE!r} fits FREE's one exit; FreeSpec.exits has many")
    head = load_confidence_head(confidence_head, config) if confidence_head else None
    batches = split_batches(
        get_task(task), tok, split, data_dir=data_dir, batch_size=batch_size,
        max_input_length=max_input_length, max_target_length=settings.max_decode_len,
        limit=num_examples, config=config,
    )  # fmt: skip
    n = sum(b.num_real for b in batches)
    print(f"{describe_config(config)}; calibrating on {task}/{split}: {n} examples")
    if many or estimator == SEQUENCE:
        exits = spec.exits if many else (exit_layer_of(spec, config),)
        conf_E, agree_E, valid = teacher_forced_records(
            config, params, batches, settings, exits, spec.measure, confidence_params=head,
            progress=progress,
        )  # fmt: skip
        if estimator == SEQUENCE:
            result = fit(conf_E[0], agree_E[0], valid)
            out_path = Path(out or Path(checkpoint) / "threshold.json")
            save_threshold(out_path, result)
            print(
                f"{SEQUENCE}: threshold {result.threshold:.4f}, share of outputs differing from "
                f"full greedy <= {epsilon:g} with probability >= {1 - delta:g}, from {len(valid)} "
                f"sequences\nwrote {out_path}"
            )
            return result
        multi = fit_exit_thresholds(
            [c[valid] for c in conf_E], [a[valid] for a in agree_E], estimator, exits=exits,
            epsilon=epsilon, delta=delta, zeta=zeta, target=target,
        )  # fmt: skip
        out_path = Path(out or Path(checkpoint) / "exit_thresholds.json")
        save_exit_thresholds(out_path, multi)
        for layer, r, c, a in zip(exits, multi.per_exit, conf_E, agree_E):
            plot_calibration(
                r, c[valid], a[valid], out_path.with_name(f"calibration_exit{layer}.png")
            )
        guarantee = (
            f"; cascade risk <= {epsilon:g} with probability >= {1 - delta:g}"
            if multi.epsilon is not None
            else ""
        )
        print(
            f"{estimator} per exit {exits}: thresholds "
            f"{', '.join(f'{t:.4f}' for t in multi.thresholds)}{guarantee} from "
            f"{int(valid.sum())} positions\nwrote {out_path}"
        )
        return multi
    conf, agree = collect_records(
        config, params, batches, settings, spec, confidence_params=head, progress=progress
    )
    start = time.perf_counter()
    result = fit(conf, agree)
    fit_s = time.perf_counter() - start
    out_path = Path(out or Path(checkpoint) / "threshold.json")
    save_threshold(out_path, result)
    plot = plot_calibration(result, conf, agree, out_path.with_name("calibration.png"))
    interval = f", interval {result.interval}" if result.interval else ""
    if result.epsilon is not None:
        interval += f", risk <= {result.epsilon:g} with probability >= {1 - result.delta:g}"
    print(
        f"{estimator}: threshold {result.threshold:.4f}{interval} from {len(conf)} records "
        f"({int(np.sum(agree))} agree) in {fit_s:.2f}s\nwrote {out_path} and {plot}"
    )
    return result


def main(argv: Sequence[str] | None = None):
    args = parse_flags(sys.argv[1:] if argv is None else argv)
    parse_gin(args.gin_file, args.gin_bindings, args.gin_search_path)
    return calibrate()


if __name__ == "__main__":
    main()
