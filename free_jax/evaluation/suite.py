"""The evaluation suite: every decoder, a threshold sweep, at each batch size, on the same inputs.

Produces one record per (decoder, batch size) with quality and speed side by side:
`decoder, method, spec, metric, score, score_ratio_vs_full, speedup_vs_full, tokens_per_s,
exit_rate, layers_per_token, ...` plus the device and batch size.

What each decoder does is its spec's (`free_jax.decoding.specs`): `SuiteSpec.free` is the FREE
every FREE row runs (fixed, adaptive, calibrated threshold; the lossless row is the same spec with
`lossless=True`), `SuiteSpec.calm` CALM's, `SuiteSpec.static` the static baseline's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from free_jax.decoding import free_bound
from free_jax.decoding.api import check_threshold
from free_jax.decoding.specs import (
    DEFAULT_THRESHOLD,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    Spec,
    StaticSpec,
    exit_layer_of,
)
from free_jax.evaluation.exit_records import early_disagreement, exit_records, padded
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
from free_jax.models.field_types import check_field_types


@dataclasses.dataclass(frozen=True)
class SuiteSpec:
    """Which decoders and thresholds to run.

    Attributes:
      free: the FREE spec of every FREE row (window, shallow S, measure, rollback, records,
        position decay); the lossless row runs it with `lossless=True` and no rollback, and the
        adaptive row with `records=True` (it refits on them). `records=False` (runs/evaluate.gin)
        lets the other plain rows compute the LM head only where a token is output.
      calm: CALM's spec (minimum exit, measure, position decay).
      static: the static baseline's spec (None: `StaticSpec(k)` with k = FREE's S).
      free_threshold, calm_threshold: the fixed thresholds of the main table.
      calibrated_threshold: FREE's threshold from threshold.json, if one was given.
      sweep_thresholds: extra FREE and CALM thresholds for the quality/speed curves.
      batch_sizes: timed batch sizes; the first is the primary one.
      sweep_batch_sizes: the batch sizes the sweep runs at (each one of `batch_sizes`; None: the
        primary one only).
      include_adaptive: a FREE row with the online threshold.
      include_lossless: a FREE lossless row.
      calibrated_guarantee: (epsilon, delta) when the calibrated threshold is Learn-then-Test's:
        the row then reports the risk measured on this split beside them.
      exits: exit layers with exit heads: adds rows "heads free" (`free` with these exits),
        "heads free lossless" and "heads calm" (`calm` with these exits), at `exit_thresholds`.
      exit_thresholds: one threshold per exit (from calibrate's exit_thresholds.json).
      exit_guarantee: (epsilon, delta) of Learn-then-Test per-exit thresholds, as above.
    """

    free: FreeSpec = FreeSpec()
    calm: CalmSpec = CalmSpec()
    static: StaticSpec | None = None
    free_threshold: float = DEFAULT_THRESHOLD
    calm_threshold: float = DEFAULT_THRESHOLD
    calibrated_threshold: float | None = None
    sweep_thresholds: tuple[float, ...] = ()
    batch_sizes: tuple[int, ...] = (8,)
    sweep_batch_sizes: tuple[int, ...] | None = None
    include_adaptive: bool = True
    include_lossless: bool = True
    calibrated_guarantee: tuple[float, float] | None = None
    exits: tuple[int, ...] | None = None
    exit_thresholds: tuple[float, ...] | None = None
    exit_guarantee: tuple[float, float] | None = None

    def __post_init__(self):
        check_field_types(self)
        # Checked here, from the gin flags, before any model loads or decoder runs.
        for name in ("free_threshold", "calm_threshold", "calibrated_threshold",
                     "sweep_thresholds", "exit_thresholds"):  # fmt: skip
            if getattr(self, name) is not None:
                check_threshold(getattr(self, name), f"SuiteSpec.{name}")
        extra = set(self.sweep_batch_sizes or ()) - set(self.batch_sizes)
        if extra:
            raise ValueError(
                f"SuiteSpec.sweep_batch_sizes={self.sweep_batch_sizes!r} names batch sizes "
                f"{sorted(extra)} that SuiteSpec.batch_sizes={self.batch_sizes!r} does not run"
            )
        if (self.exits is None) != (self.exit_thresholds is None) or (
            self.exits is not None and len(self.exits) != len(self.exit_thresholds)
        ):
            raise ValueError(
                f"SuiteSpec.exits={self.exits!r} needs exit_thresholds with one value per exit, "
                f"got {self.exit_thresholds!r}"
            )
        for field, cls in (("free", FreeSpec), ("calm", CalmSpec)):
            if not isinstance(getattr(self, field), cls):
                raise TypeError(
                    f"SuiteSpec.{field} must be a {cls.__name__}, got {getattr(self, field)!r}"
                )
        if self.static is not None and not isinstance(self.static, StaticSpec):
            raise TypeError(f"SuiteSpec.static must be a StaticSpec or None, got {self.static!r}")


def main_choices(config: T5Config, suite: SuiteSpec) -> list[DecoderChoice]:
    free = suite.free
    static = suite.static or StaticSpec(exit_layer=exit_layer_of(free, config))
    choices = [
        DecoderChoice("full", GreedySpec()),
        DecoderChoice(f"static (k={static.exit_layer})", static),
        DecoderChoice(f"calm (thr={suite.calm_threshold:g})", suite.calm, suite.calm_threshold),
        DecoderChoice(f"free (thr={suite.free_threshold:g})", free, suite.free_threshold),
    ]
    if suite.include_adaptive:
        adaptive = dataclasses.replace(free, records=True)  # it refits on the records
        choices.append(DecoderChoice("free (adaptive)", adaptive, adaptive=True))
    if suite.calibrated_threshold is not None:
        thr = suite.calibrated_threshold
        name = f"free (calibrated {thr:.3f})"
        if suite.calibrated_guarantee is not None:
            name = f"free (ltt {thr:.3f})"
        choices.append(DecoderChoice(name, free, thr, guarantee=suite.calibrated_guarantee))
    if suite.include_lossless:
        lossless = dataclasses.replace(free, lossless=True, rollback=None)
        choices.append(DecoderChoice(f"free lossless (thr={suite.free_threshold:g})", lossless,
                                     suite.free_threshold))  # fmt: skip
    if suite.exits is not None:
        thr, label = (
            tuple(suite.exit_thresholds),
            ", ".join(f"{t:.2f}" for t in suite.exit_thresholds),
        )
        heads = dataclasses.replace(free, shallow=None, exits=suite.exits)
        exits = ",".join(map(str, suite.exits))
        guarantee = suite.exit_guarantee
        choices += [
            DecoderChoice(f"heads {exits} free ({label})", heads, thr, guarantee=guarantee),
            DecoderChoice(f"heads {exits} free lossless",
                          dataclasses.replace(heads, lossless=True, rollback=None), thr),
            DecoderChoice(f"heads {exits} calm ({label})",
                          dataclasses.replace(suite.calm, min_exit=1, exits=suite.exits), thr,
                          guarantee=guarantee),
        ]  # fmt: skip
    return choices


def sweep_choices(suite: SuiteSpec) -> list[DecoderChoice]:
    out = []
    for thr in suite.sweep_thresholds:
        out.append(DecoderChoice(f"sweep free {thr:g}", suite.free, thr))
        out.append(DecoderChoice(f"sweep calm {thr:g}", suite.calm, thr))
    return out


def spec_fields(spec: Spec) -> dict:
    """A spec as a JSON-ready dict: {"type": "FreeSpec", "window": 8, ...}."""
    return {"type": type(spec).__name__, **dataclasses.asdict(spec)}


def device_name() -> str:
    d = jax.devices()[0]
    return f"{d.platform}:{getattr(d, 'device_kind', d.platform)}"


def _record(run: DecoderRun, scores, predictions, full, config: T5Config, metric: str, kind: str):
    num_layers, spec = config.num_decoder_layers, run.choice.spec
    p = run.exit_rate(num_layers)
    same = None
    if full is not None:
        same = float(np.mean([np.array_equal(a, b) for a, b in zip(run.tokens, full[0].tokens)]))
    rec = {
        "decoder": run.choice.name,
        "method": run.choice.method,
        "spec": spec_fields(run.choice.spec),
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
        "bound": _bound(run, spec, config, p),
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


def _bound(run: DecoderRun, spec: Spec, config, exit_rate: float) -> float | None:
    """FREE's decoder-compute bound: L over the mean depth a token waits for (its exit layer).
    With one exit that is `free_bound`."""
    if not isinstance(spec, FreeSpec):
        return None
    if spec.exits is None or len(spec.exits) == 1:
        return free_bound(config.num_decoder_layers, exit_layer_of(spec, config), exit_rate)
    depths = np.concatenate(run.exit_layers) if run.exit_layers else np.zeros(0)
    return config.num_decoder_layers / float(depths.mean()) if depths.size else None


def measured_risk(config, params, run: DecoderRun, inputs: Sequence[EvalBatch], settings,
                  confidence_params=None) -> dict:  # fmt: skip
    """The risk a Learn-then-Test threshold bounds, measured on a run's outputs: the share of its
    tokens that left early and differ from the full model's prediction at that position (one
    teacher-forced pass per batch, `exit_records`)."""
    bad = total = done = 0
    for batch in inputs:
        k, b = batch.num_real, batch.encoder_tokens_BS.shape[0]
        tokens_BN, valid_BN = padded(run.tokens[done : done + k], b, settings.max_decode_len)
        layers_BN, _ = padded(run.exit_layers[done : done + k], b, settings.max_decode_len)
        done += k
        deep_BN = exit_records(
            config, params, batch.encoder_tokens_BS, tokens_BN,
            prompt_lengths_B=batch.prompt_lengths_B, confidence_params=confidence_params,
        ).deep_BN  # fmt: skip
        n_bad, n = early_disagreement(
            tokens_BN, layers_BN, deep_BN, valid_BN, config.num_decoder_layers
        )
        bad, total = bad + n_bad, total + n
    epsilon, delta = run.choice.guarantee
    return {"epsilon": epsilon, "delta": delta, "measured_risk": bad / max(total, 1),
            "num_tokens": total}  # fmt: skip


def run_suite(
    config: T5Config,
    params,
    batches: Sequence[EvalBatch],
    detokenize: Callable[[np.ndarray], str],
    metric: str,
    settings: EvalSettings,
    suite: SuiteSpec,
    *,
    confidence_params=None,
    progress: bool = True,
) -> tuple[list[dict], dict]:
    """Runs the suite; returns (records, extras) where extras holds agreement records and outputs.

    `confidence_params`: a `ConfidenceHead`'s parameters, for specs whose measure is "learned".
    """
    records, extras = [], {"predictions": {}, "records": None}
    for i, batch_size in enumerate(suite.batch_sizes):
        inputs = rebatch(batches, batch_size)
        sweeps = suite.sweep_batch_sizes or suite.batch_sizes[:1]
        choices = main_choices(config, suite) + (
            sweep_choices(suite) if batch_size in sweeps else []
        )
        full = None
        for choice in choices:
            run = run_decoder(
                choice, config, params, inputs, settings, confidence_params=confidence_params,
                progress=progress,
            )  # fmt: skip
            scores, predictions = score_run(run, inputs, detokenize, metric)
            if isinstance(choice.spec, GreedySpec):
                full = (run, scores)
            kind = "sweep" if choice.name.startswith("sweep") else "main"
            records.append(_record(run, scores, predictions, full, config, metric, kind))
            if choice.guarantee is not None:
                records[-1]["guarantee"] = measured_risk(
                    config, params, run, inputs, settings, confidence_params
                )
            if i == 0 and kind == "main":
                extras["predictions"][choice.name] = predictions
            if i == 0 and choice.method == "free_lossless":
                extras["lossless_equals_full"] = records[-1]["same_outputs_as_full"] == 1.0
            if i == 0 and choice.adaptive:
                extras["records"] = (run.records_confidence, run.records_agree)
                extras["online"] = run.online
    return records, extras
