"""The evaluation suite: every decoder, a threshold sweep, at each batch size, on the same inputs.

Produces one record per (decoder, batch size) with quality and speed side by side:
`decoder, metric, score, score_ratio_vs_full, speedup_vs_full, tokens_per_s, exit_rate,
layers_per_token, ...` plus the device and batch size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from free_jax.decoding import free_bound
from free_jax.evaluation.runner import (
    DecoderChoice,
    DecoderRun,
    EvalBatch,
    EvalSettings,
    rebatch,
    run_decoder,
    score_run,
)
from free_jax.models import T5Config


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """Which decoders and thresholds to run.

    Attributes:
      free_threshold, calm_threshold: the fixed thresholds of the main table.
      static_exit_layer: k of the static baseline (None: FREE's S).
      calm_min_exit_layer: CALM's first exit.
      calibrated_threshold: FREE's threshold from threshold.json, if one was given.
      sweep_thresholds: extra FREE and CALM thresholds for the quality/speed curves (primary batch
        size only).
      batch_sizes: timed batch sizes; the first is the primary one.
    """

    free_threshold: float = 0.9
    calm_threshold: float = 0.9
    static_exit_layer: int | None = None
    calm_min_exit_layer: int = 1
    calibrated_threshold: float | None = None
    sweep_thresholds: tuple[float, ...] = ()
    batch_sizes: tuple[int, ...] = (8,)
    include_adaptive: bool = True
    include_lossless: bool = True


def main_choices(config: T5Config, spec: SuiteSpec) -> list[DecoderChoice]:
    s = config.shallow_layer
    choices = [
        DecoderChoice("full", "greedy"),
        DecoderChoice(f"static (k={spec.static_exit_layer or s})", "static",
                      exit_layer=spec.static_exit_layer or s),
        DecoderChoice(f"calm (thr={spec.calm_threshold:g})", "calm", spec.calm_threshold,
                      exit_layer=spec.calm_min_exit_layer),
        DecoderChoice(f"free (thr={spec.free_threshold:g})", "free", spec.free_threshold),
    ]  # fmt: skip
    if spec.include_adaptive:
        choices.append(DecoderChoice("free (adaptive)", "free", adaptive=True))
    if spec.calibrated_threshold is not None:
        thr = spec.calibrated_threshold
        choices.append(DecoderChoice(f"free (calibrated {thr:.3f})", "free", thr))
    if spec.include_lossless:
        choices.append(DecoderChoice(f"free lossless (thr={spec.free_threshold:g})",
                                     "free_lossless", spec.free_threshold))  # fmt: skip
    return choices


def sweep_choices(spec: SuiteSpec) -> list[DecoderChoice]:
    out = []
    for thr in spec.sweep_thresholds:
        out.append(DecoderChoice(f"sweep free {thr:g}", "free", thr))
        out.append(DecoderChoice(f"sweep calm {thr:g}", "calm", thr,
                                 exit_layer=spec.calm_min_exit_layer))  # fmt: skip
    return out


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def _record(run: DecoderRun, scores, predictions, full, config: T5Config, metric: str, kind: str):
    num_layers, shallow = config.num_decoder_layers, config.shallow_layer
    p = run.exit_rate(num_layers)
    same = None
    if full is not None:
        same = float(np.mean([np.array_equal(a, b) for a, b in zip(run.tokens, full[0].tokens)]))
    rec = {
        "decoder": run.choice.name,
        "method": run.choice.method,
        "kind": kind,
        "threshold": run.choice.threshold,
        "metric": metric,
        "score": scores["score"],
        "scores": scores,
        "score_ratio_vs_full": scores["score"] / full[1]["score"]
        if full and full[1]["score"]
        else 1.0,
        "speedup_vs_full": full[0].wall_s / run.wall_s if full else 1.0,
        "tokens_per_s": run.tokens_per_s,
        "examples_per_s": run.examples_per_s,
        "exit_rate": p,
        "layers_per_token": run.layers_per_token,
        "deep_passes_per_token": run.deep_passes_per_token,
        "bound": free_bound(num_layers, shallow, p)
        if run.choice.method.startswith("free")
        else None,
        "same_outputs_as_full": same if full else 1.0,
        "loop_rate": scores["loop_rate"],
        "compile_s": run.compile_s,
        "wall_s": run.wall_s,
        "num_examples": run.num_examples,
        "num_tokens": run.num_tokens,
        "batch_size": run.batch_size,
        "device": device_name(),
        "examples": predictions[:3],
    }
    if run.online is not None:
        rec["threshold"] = run.online.threshold
        result = run.online.result
        rec["adaptive"] = {
            "final_threshold": run.online.threshold,
            "interval": list(result.interval) if result is not None and result.interval else None,
            "num_refits": run.online.num_refits,
            "num_records": run.online.num_records,
        }
    return rec


def run_suite(
    config: T5Config,
    params,
    batches: Sequence[EvalBatch],
    detokenize: Callable[[np.ndarray], str],
    metric: str,
    settings: EvalSettings,
    spec: SuiteSpec,
    *,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Runs the suite; returns (records, extras) where extras holds agreement records and outputs."""
    records, extras = [], {"predictions": {}, "records": None}
    for i, batch_size in enumerate(spec.batch_sizes):
        inputs = rebatch(batches, batch_size)
        choices = main_choices(config, spec) + (sweep_choices(spec) if i == 0 else [])
        full = None
        for choice in choices:
            run = run_decoder(choice, config, params, inputs, settings, progress=progress)
            scores, predictions = score_run(run, inputs, detokenize, metric)
            if choice.method == "greedy":
                full = (run, scores)
            kind = "sweep" if choice.name.startswith("sweep") else "main"
            records.append(_record(run, scores, predictions, full, config, metric, kind))
            if i == 0 and kind == "main":
                extras["predictions"][choice.name] = predictions
            if i == 0 and choice.method == "free_lossless":
                extras["lossless_equals_full"] = records[-1]["same_outputs_as_full"] == 1.0
            if i == 0 and choice.adaptive:
                extras["records"] = (run.records_confidence, run.records_agree)
                extras["online"] = run.online
    return records, extras
