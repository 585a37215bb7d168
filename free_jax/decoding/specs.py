"""One frozen spec per decoding method: every option of a method, named once.

The same spec objects are used by `decoding.decode`, the evaluation suite, `generate`,
`calibrate`, the decode benchmark and gin (they are registered as gin configurables by the entry
points), so an option added here is reachable everywhere.

    decode(config, params, inputs_BS, FreeSpec(window=8, measure="softmax_max"),
           max_decode_len=64, threshold=0.9)

Two kinds of field:
* static ones select code (layer counts, the window, the measure, whether FREE verifies): a new
  value compiles a new decoder;
* value fields (`TRACED_FIELDS`: CALM/FREE's `position_temp`, FREE's `rollback` threshold and
  deferral policy, sampling's `temperature`, beam search's `length_penalty`) are passed to the compiled decoder as
  traced arrays: a new value never recompiles (`compile_key` blanks them out).
The exit threshold itself is not part of any spec: it is what calibration produces and sweeps
vary, so it is given per call.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from free_jax.decoding.confidence import check_measure

DEFAULT_MEASURE = "softmax_margin"
DEFAULT_THRESHOLD = 0.9  # the exit threshold used where none is given (FREE's and CALM's papers)


def _freeze_exits(spec) -> None:
    """Stores `exits` as a tuple of ints (gin and JSON give lists), keeping the spec hashable."""
    if spec.exits is not None:
        if isinstance(spec.exits, int | str) or not len(spec.exits):
            raise ValueError(
                f"{type(spec).__name__}.exits must be a non-empty sequence of layers, "
                f"got {spec.exits!r}"
            )
        object.__setattr__(spec, "exits", tuple(int(x) for x in spec.exits))


def num_exits(spec) -> int:
    """How many thresholds a call takes: len(exits) for CALM/FREE with exits, else 1."""
    exits = getattr(spec, "exits", None)
    return 1 if exits is None else len(exits)


@dataclasses.dataclass(frozen=True)
class GreedySpec:
    """The full model, argmax at every step."""

    method = "greedy"


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """The full model, sampling.

    Attributes:
      top_k: sample among the top_k logits (0: the whole vocabulary); static.
      temperature: softmax temperature (traced).
    """

    top_k: int = 0
    temperature: float = 1.0
    method = "sample"

    def __post_init__(self):
        if self.top_k < 0:
            raise ValueError(f"SampleSpec.top_k must be >= 0, got {self.top_k}")


@dataclasses.dataclass(frozen=True)
class BeamSpec:
    """Full-model beam search.

    Attributes:
      beam_size: K beams (static).
      length_penalty: alpha in ((5 + length) / 6) ** alpha (traced; 0 ranks by log-probability).
    """

    beam_size: int = 4
    length_penalty: float = 0.0
    method = "beam"

    def __post_init__(self):
        if self.beam_size < 1:
            raise ValueError(f"BeamSpec.beam_size must be >= 1, got {self.beam_size}")


@dataclasses.dataclass(frozen=True)
class StaticSpec:
    """Every token leaves after decoder layer `exit_layer` (k, 1 <= k < L)."""

    exit_layer: int
    measure: str = DEFAULT_MEASURE
    method = "static"

    def __post_init__(self):
        check_measure(self.measure)


@dataclasses.dataclass(frozen=True)
class CalmSpec:
    """CALM: an exit test after every layer from `min_exit`, with state copying.

    Attributes:
      min_exit: the first layer whose exit is tested (1 <= m < L).
      measure: confidence measure (`confidence.MEASURES`).
      position_temp: CALM's threshold decay over positions (0: none; traced).
      exits: test only after these increasing layers (e.g. where exit heads sit), each with its
        own threshold (the call's threshold: a scalar or one per exit); None: every layer from
        `min_exit`. Excludes a non-default `min_exit`.
    """

    min_exit: int = 1
    measure: str = DEFAULT_MEASURE
    position_temp: float = 0.0
    exits: tuple[int, ...] | None = None
    method = "calm"

    def __post_init__(self):
        check_measure(self.measure)
        _freeze_exits(self)
        if self.exits is not None and self.min_exit != 1:
            raise ValueError("CalmSpec: give min_exit or exits, not both")


@dataclasses.dataclass(frozen=True)
class FreeSpec:
    """FREE's synchronized parallel decoding (plain, rollback or lossless).

    Attributes:
      shallow: S, the shallow exit layer (None: the config's `shallow_layer`).
      window: W, the most positions in one deep pass.
      lossless: reject every shallow token the deep layers disagree with (output = greedy).
      rollback: FREE's rollback policy: reject a shallow token whose deep cross-entropy exceeds
        this value (None: no rollback; the value is traced).
      records: keep the (confidence, agree) records that calibration fits; False lets plain FREE's
        deep exit read only the current position.
      measure: the shallow confidence measure.
      position_temp: CALM-style threshold decay over positions (0: none; traced).
      exits: many exits (increasing layers, e.g. where exit heads sit): a token leaves at the
        first whose confidence passes its threshold (the call's threshold: a scalar or one per
        exit), with exact caches (see `free.py`); None: the one exit `shallow`. Excludes
        `shallow`.
      min_waiting, max_wait: the deferral policy in a batch (`deferral.py`; traced): the deep pass
        runs once `min_waiting` examples wait for it, or one has waited `max_wait` shallow steps;
        (1, 0), the default, runs it as soon as one example needs it (FREE as published).
        `deferral.plan_deferral` chooses them from measured step costs. Outputs never change.
    """

    shallow: int | None = None
    window: int = 8
    lossless: bool = False
    rollback: float | None = None
    records: bool = True
    measure: str = DEFAULT_MEASURE
    position_temp: float = 0.0
    exits: tuple[int, ...] | None = None
    min_waiting: int = 1
    max_wait: int = 0
    method = "free"

    def __post_init__(self):
        check_measure(self.measure)
        _freeze_exits(self)
        if self.exits is not None and self.shallow is not None:
            raise ValueError("FreeSpec: give shallow or exits, not both")
        if self.exits is not None and len(self.exits) > 1 and self.measure == "hidden_cosine":
            raise ValueError("FreeSpec: measure 'hidden_cosine' supports one exit only")
        if self.min_waiting < 1 or self.max_wait < 0:
            raise ValueError(
                f"FreeSpec: min_waiting must be >= 1 and max_wait >= 0, got {self.min_waiting} "
                f"and {self.max_wait}"
            )
        if self.window < 1:
            raise ValueError(f"FreeSpec.window must be >= 1, got {self.window}")
        if self.lossless and self.rollback is not None:
            raise ValueError("FreeSpec: lossless and rollback exclude each other")

    @property
    def mode(self) -> str:
        """free_loop's mode: "lossless", "rollback" or "plain"."""
        if self.lossless:
            return "lossless"
        return "plain" if self.rollback is None else "rollback"


SPECS = (GreedySpec, SampleSpec, BeamSpec, StaticSpec, CalmSpec, FreeSpec)
# Method names (as `decode(..., method=)`, `generate --decoder` and the benchmark use them).
METHODS = ("greedy", "sample", "beam", "static", "calm", "free", "free_lossless")
EARLY_EXIT = (StaticSpec, CalmSpec, FreeSpec)
NEEDS_THRESHOLD = (CalmSpec, FreeSpec)
SKIPPED_KV = ("copy_state", "share_loop0")


@dataclasses.dataclass(frozen=True)
class DepthwiseSpec:
    """Continuous depth-wise batching of a recursive model (`decoding.depthwise`).

    Not a `decode` method: the engine serves a queue of requests through `slots` slots
    (`depthwise_decode`), and its threshold (the loop-boundary exit) is given per call.

    Attributes:
      slots: R, requests decoded at once.
      max_new_tokens: N, tokens each request may emit (EOS ends it sooner).
      synchronized: run as ordinary batched early exit instead (a slot that exited waits for the
        batch; a batch is refilled only when all its requests are done): the baseline.
      skipped_kv: keys/values of skipped loops: "copy_state" (from the exit state, CALM) or
        "share_loop0" (the loop-0 layer's, recursive KV sharing).
      measure: the loop-boundary confidence (`decoding.confidence`).
    """

    slots: int = 8
    max_new_tokens: int = 32
    synchronized: bool = False
    skipped_kv: str = "copy_state"
    measure: str = DEFAULT_MEASURE

    def __post_init__(self):
        for name in ("slots", "max_new_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"DepthwiseSpec.{name}={value!r} must be an integer >= 1")
        if self.skipped_kv not in SKIPPED_KV:
            raise ValueError(
                f"DepthwiseSpec.skipped_kv={self.skipped_kv!r}; expected one of {SKIPPED_KV}"
            )
        check_measure(self.measure)
        if self.measure in ("hidden_cosine", "learned"):
            raise ValueError(
                f"DepthwiseSpec.measure={self.measure!r}: the engine reads the exit's logits "
                "only (softmax_margin, softmax_max or entropy)"
            )


TRACED_FIELDS = (
    "position_temp", "rollback", "temperature", "length_penalty", "min_waiting", "max_wait"
)  # fmt: skip

Spec = GreedySpec | SampleSpec | BeamSpec | StaticSpec | CalmSpec | FreeSpec


def compile_key(spec: Spec) -> Spec:
    """`spec` with its traced values blanked: equal keys share one compiled decoder."""
    blank: dict[str, Any] = {}
    for field in dataclasses.fields(spec):
        if field.name in TRACED_FIELDS:
            value = getattr(spec, field.name)
            default = 0.0 if field.default is None else field.default  # a valid placeholder
            blank[field.name] = None if value is None else default
    return dataclasses.replace(spec, **blank)


def check_spec(spec: Spec, config) -> None:
    """Rejects layer choices the model does not have (errors name the spec field)."""
    if not isinstance(spec, SPECS):
        raise TypeError(
            f"not a decoding spec: {spec!r}; expected one of {[s.__name__ for s in SPECS]}"
        )
    name = type(spec).__name__
    if isinstance(spec, StaticSpec):
        config.check_exit_layer(spec.exit_layer, what=f"{name}.exit_layer")
    if isinstance(spec, CalmSpec):
        config.check_exit_layer(spec.min_exit, what=f"{name}.min_exit")
    if isinstance(spec, FreeSpec) and spec.shallow is not None:
        config.check_exit_layer(spec.shallow, what=f"{name}.shallow")
    if getattr(spec, "exits", None) is not None:
        from free_jax.decoding.free import check_exits  # free.py imports nothing from here

        check_exits(config, spec.exits, what=f"{name}.exits")


def spec_for(
    method: str,
    *,
    exit_layer: int | None = None,
    window: int = 8,
    measure: str = DEFAULT_MEASURE,
    rollback: float | None = None,
    records: bool = True,
    position_temp: float = 0.0,
    top_k: int = 0,
    temperature: float = 1.0,
    beam_size: int = 4,
    length_penalty: float = 0.0,
    exits: tuple[int, ...] | None = None,
) -> Spec:
    """The spec of a method name (`METHODS`) from keyword options — the keyword form of `decode`.

    `exit_layer` is k for "static", the minimum exit for "calm" (default 1) and S for "free" /
    "free_lossless" (default: the config's); `exits` gives CALM and FREE many exits instead.

    >>> spec_for("free_lossless", exit_layer=2, window=4)
    FreeSpec(shallow=2, window=4, lossless=True, rollback=None, records=True, measure='softmax_margin', position_temp=0.0, exits=None, min_waiting=1, max_wait=0)
    """
    if method not in METHODS:
        raise ValueError(f"unknown decoding method {method!r}; expected one of {METHODS}")
    if rollback is not None and method != "free":
        raise ValueError("rollback applies to method 'free' only")
    if exits is not None and method not in ("calm", "free", "free_lossless"):
        raise ValueError(f"exits applies to methods calm, free and free_lossless, not {method!r}")
    if method == "greedy":
        return GreedySpec()
    if method == "sample":
        return SampleSpec(top_k=top_k, temperature=temperature)
    if method == "beam":
        return BeamSpec(beam_size=beam_size, length_penalty=length_penalty)
    if method == "static":
        if exit_layer is None:
            raise ValueError("method 'static' needs exit_layer=k")
        return StaticSpec(exit_layer=exit_layer, measure=measure)
    if method == "calm":
        return CalmSpec(
            min_exit=1 if exit_layer is None else exit_layer, measure=measure,
            position_temp=position_temp, exits=exits,
        )  # fmt: skip
    return FreeSpec(
        shallow=exit_layer, window=window, lossless=method == "free_lossless", rollback=rollback,
        records=records, measure=measure, position_temp=position_temp, exits=exits,
    )  # fmt: skip


def method_name(spec: Spec) -> str:
    """The `METHODS` name of a spec ("free_lossless" for a lossless `FreeSpec`)."""
    if isinstance(spec, FreeSpec) and spec.lossless:
        return "free_lossless"
    return spec.method


def exit_layer_of(spec: Spec, config) -> int | None:
    """The layer a spec's (first) early exit sits at: k (static), the minimum exit (CALM), S
    (FREE)."""
    if getattr(spec, "exits", None) is not None:
        return spec.exits[0]
    if isinstance(spec, StaticSpec):
        return spec.exit_layer
    if isinstance(spec, CalmSpec):
        return spec.min_exit
    if isinstance(spec, FreeSpec):
        return config.shallow_layer if spec.shallow is None else spec.shallow
    return None
