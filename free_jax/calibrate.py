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
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import gin
import numpy as np

from free_jax import gin_configurables  # noqa: F401  (registers the specs calibrate.gin binds)
from free_jax.calibration import NEVER_EXIT, plot_calibration, resolve_estimator, save_threshold
from free_jax.data import get_task
from free_jax.decoding.specs import FreeSpec
from free_jax.evaluation import DecoderChoice, EvalSettings, run_decoder
from free_jax.evaluation.runner import split_batches
from free_jax.loading import describe_config, load_confidence_head, load_model_and_tokenizer
from free_jax.train import parse_flags, parse_gin


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
    progress: bool = True,
):
    """Decodes, fits and writes `threshold.json`; returns the `ThresholdResult`.

    `spec`: the FREE decoder whose threshold is fitted (None: `FreeSpec()`); `confidence_head`: a
    file from `loading.save_confidence_head`, for `FreeSpec.measure = 'learned'`. Each estimator
    reads its own levels: zeta ("svi", "nuts", "moments"), epsilon and delta ("ltt"), target
    ("target_accuracy").
    """
    settings = settings or EvalSettings()
    # Resolved first, so that an unknown name or a missing level fails before the decoding does.
    fit = resolve_estimator(
        estimator, zeta=zeta, epsilon=epsilon, delta=delta, target=target, seed=0
    )
    config, params, tok = load_model_and_tokenizer(
        checkpoint, tokenizer, flag="calibrate.tokenizer"
    )
    head = load_confidence_head(confidence_head, config) if confidence_head else None
    batches = split_batches(
        get_task(task), tok, split, data_dir=data_dir, batch_size=batch_size,
        max_input_length=max_input_length, max_target_length=settings.max_decode_len,
        limit=num_examples, config=config,
    )  # fmt: skip
    n = sum(b.num_real for b in batches)
    print(f"{describe_config(config)}; calibrating on {task}/{split}: {n} examples")
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
