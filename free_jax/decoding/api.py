"""`decode`: one entry point for every decoder and model family, jitted once per static choice.

    result = decode(config, params, inputs_BS, FreeSpec(window=8), max_decode_len=64,
                    threshold=0.9)
    result = decode(config, params, inputs_BS, method="free", window=8, max_decode_len=64,
                    threshold=0.9)                                  # the same, keyword form
    result.tokens, result.exit_layer, result.confidence   # [B, 64] each
    result.records.pairs()                                # FREE's (confidence, agree) pairs

`inputs_BS` are T5's encoder tokens (0 is padding) or a decoder-only model's prompts, right-padded,
with `prompt_lengths` [B] saying where each ends (the padding values are never read): the prompt
is prefilled into every layer's cache and `.tokens` are the tokens generated after it.

Static (a new value compiles once): the config, the spec's static fields (see `specs.py`),
max_decode_len and the input shapes. Traced (a new value never recompiles): params, the inputs,
the threshold, the spec's value fields (position_temp, rollback, temperature, length_penalty,
FREE's deferral policy min_waiting / max_wait),
per-example max lengths and prompt lengths, the sampling key and the learned confidence head's
parameters.

For timing, `make_decoder(...)` returns the jitted `Decoder` itself:

    run = make_decoder(config, FreeSpec(window=8), max_decode_len=64)
    run(params, inputs_BS, 0.9).tokens.block_until_ready()
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from free_jax.decoding import specs as specs_lib
from free_jax.decoding.beam import beam_search
from free_jax.decoding.calm import calm_decode
from free_jax.decoding.free import free_decode
from free_jax.decoding.greedy import greedy_decode, sample_decode
from free_jax.decoding.specs import (
    METHODS,
    BeamSpec,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    SampleSpec,
    Spec,
    StaticSpec,
    spec_for,
)
from free_jax.decoding.state import BeamResult, DecodeResult
from free_jax.decoding.static import static_decode
from free_jax.models.protocol import check_tokens

__all__ = ["METHODS", "Decoder", "DecoderSpec", "check_threshold", "decode", "make_decoder"]

# How many times each static configuration was traced (a retrace means a recompile).
TRACE_COUNTS: collections.Counter = collections.Counter()


def check_threshold(threshold, name: str = "threshold") -> np.ndarray:
    """The threshold's values as float32; a ValueError naming `name` unless it is real numbers.

    Any real number is a threshold (see `decode`); NaN is not: no confidence is greater than NaN,
    so a NaN threshold silently never exits (and a FREE that waits for a shallow exit never
    ends). Strings and bools are not numbers, even where numpy would convert them.

    >>> check_threshold([0.5, -1.0, float("inf")])
    array([ 0.5, -1. ,  inf], dtype=float32)
    >>> check_threshold(float("nan"), "--threshold")
    Traceback (most recent call last):
    ...
    ValueError: --threshold is NaN; give a real number (exit when confidence > threshold)
    """
    kind = np.asarray(threshold).dtype.kind if not isinstance(threshold, str | bytes) else "U"
    if kind not in "iuf":  # "b" bool, "U"/"S" text, "O" anything else, "c" complex
        raise ValueError(f"{name} must be a real number, got {threshold!r}")
    values = np.asarray(threshold, np.float32)
    if np.isnan(values).any():
        raise ValueError(f"{name} is NaN; give a real number (exit when confidence > threshold)")
    return values


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Everything static about a compiled decoder (hashable, holds no arrays).

    Attributes:
      config: the model config (any registered family).
      spec: the method's spec with its traced values blanked (`specs.compile_key`).
      max_decode_len: N.
    """

    config: Any
    spec: Spec
    max_decode_len: int

    def __post_init__(self):
        if self.max_decode_len < 1:
            raise ValueError(f"max_decode_len must be >= 1, got {self.max_decode_len}")
        specs_lib.check_spec(self.spec, self.config)

    @property
    def method(self) -> str:
        return specs_lib.method_name(self.spec)


@struct.dataclass
class TracedOptions:
    """Per-call values, traced (shapes fixed per spec and batch).

    Attributes:
      threshold: [] float32, or [m] one per exit (specs with `exits`).
      position_temp, rollback_threshold, temperature, length_penalty: [] float32.
      min_waiting, max_wait: [] int32 FREE's deferral policy.
      max_lengths_B: [B] int32.
      input_lengths_B: [B] int32 prompt lengths (decoder-only models), or None.
      rng: a PRNG key (sampling).
      confidence_params: `ConfidenceHead` parameters, or None.
    """

    threshold: jax.Array
    position_temp: jax.Array
    rollback_threshold: jax.Array
    temperature: jax.Array
    length_penalty: jax.Array
    min_waiting: jax.Array
    max_wait: jax.Array
    max_lengths_B: jax.Array
    input_lengths_B: Any
    rng: jax.Array
    confidence_params: Any = None


def _run(key: DecoderSpec, params, inputs_BS, options: TracedOptions):
    TRACE_COUNTS[key] += 1  # runs at trace time only
    c, n, spec = key.config, key.max_decode_len, key.spec
    common = dict(
        max_decode_len=n, max_lengths_B=options.max_lengths_B,
        input_lengths_B=options.input_lengths_B,
    )  # fmt: skip
    if isinstance(spec, BeamSpec):
        return beam_search(
            c, params, inputs_BS, beam_size=spec.beam_size,
            length_penalty=options.length_penalty, **common,
        )  # fmt: skip
    scored = dict(
        common, measure=getattr(spec, "measure", specs_lib.DEFAULT_MEASURE),
        confidence_params=options.confidence_params,
    )  # fmt: skip
    if isinstance(spec, GreedySpec):
        return greedy_decode(c, params, inputs_BS, **scored)
    if isinstance(spec, SampleSpec):
        return sample_decode(
            c, params, inputs_BS, rng=options.rng, temperature=options.temperature,
            top_k=spec.top_k, **scored,
        )  # fmt: skip
    if isinstance(spec, StaticSpec):
        return static_decode(c, params, inputs_BS, exit_layer=spec.exit_layer, **scored)
    if isinstance(spec, CalmSpec):
        return calm_decode(
            c, params, inputs_BS, options.threshold, min_exit_layer=spec.min_exit,
            position_temp=options.position_temp, exits=spec.exits, **scored,
        )  # fmt: skip
    if spec.shallow is not None:
        c = c.replace(shallow_exit_layer=spec.shallow)
    return free_decode(
        c, params, inputs_BS, options.threshold, window=spec.window, mode=spec.mode,
        rollback_threshold=options.rollback_threshold, position_temp=options.position_temp,
        records=spec.records, exits=spec.exits, min_waiting=options.min_waiting,
        max_wait=options.max_wait, **scored,
    )  # fmt: skip


@functools.lru_cache(maxsize=256)
def _jitted(key: DecoderSpec):
    return jax.jit(functools.partial(_run, key))


def _check_prompt_lengths(lengths, inputs_BS, config, max_decode_len: int):
    """Concrete prompt lengths within [1, S]; learned positions must cover prompt + output."""
    if lengths is None or isinstance(lengths, jax.core.Tracer):
        return
    arr = np.asarray(lengths)
    b, s = inputs_BS.shape
    if arr.shape != (b,):
        raise ValueError(f"prompt_lengths has shape {arr.shape}; expected ({b},), one per prompt")
    if arr.size and (arr.min() < 1 or arr.max() > s):
        raise ValueError(
            f"prompt_lengths must lie in [1, {s}] (the prompt width), got min {int(arr.min())}, "
            f"max {int(arr.max())}"
        )
    table = getattr(config, "max_position_embeddings", None)
    if getattr(config, "positions", None) == "learned" and table is not None:
        if int(arr.max()) + max_decode_len > table:
            raise ValueError(
                f"prompt ({int(arr.max())} tokens) + max_decode_len ({max_decode_len}) exceeds "
                f"the model's {table} learned positions (max_position_embeddings)"
            )


class Decoder:
    """A decoder jitted for one static choice: `decoder(params, inputs_BS, threshold)`.

    Attributes:
      spec: the `DecoderSpec` (compile key); `method_spec` the full method spec whose traced
        values are the defaults of each call.
    """

    def __init__(self, config, method_spec: Spec, max_decode_len: int):
        self.method_spec = method_spec
        self.spec = DecoderSpec(config, specs_lib.compile_key(method_spec), max_decode_len)
        self.jitted = _jitted(self.spec)

    def options(
        self,
        batch: int,
        threshold=None,
        *,
        position_temp=None,
        rollback_threshold=None,
        max_lengths=None,
        prompt_lengths=None,
        confidence_params=None,
        rng=None,
        temperature=None,
        length_penalty=None,
        min_waiting=None,
        max_wait=None,
    ) -> TracedOptions:
        spec, n = self.method_spec, self.spec.max_decode_len
        if isinstance(spec, specs_lib.NEEDS_THRESHOLD) and threshold is None:
            raise ValueError(f"{type(spec).__name__} needs a threshold")
        # A traced threshold (a decoder inside the caller's jit) has no value to check here.
        if threshold is not None and not isinstance(threshold, jax.core.Tracer):
            values = check_threshold(threshold)
            m = specs_lib.num_exits(spec)
            if values.shape not in ((), (m,)):
                raise ValueError(
                    f"threshold has shape {values.shape}; {type(spec).__name__} takes a scalar"
                    + (f" or one per exit ({m},)" if m > 1 else "")
                )
        if getattr(spec, "measure", None) == "learned" and confidence_params is None:
            raise ValueError("measure 'learned' needs confidence_params (a ConfidenceHead's)")
        default = lambda given, field, fallback: (
            given if given is not None else getattr(spec, field, fallback)
        )
        rollback = default(rollback_threshold, "rollback", None)
        if isinstance(spec, FreeSpec) and spec.rollback is not None and rollback is None:
            raise ValueError("a rolling-back FREE decoder needs rollback_threshold")
        if max_lengths is None:
            max_lengths = np.full((batch,), n, np.int32)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return TracedOptions(
            threshold=f32(0.0 if threshold is None else threshold),
            position_temp=f32(default(position_temp, "position_temp", 0.0)),
            rollback_threshold=f32(np.inf if rollback is None else rollback),
            temperature=f32(default(temperature, "temperature", 1.0)),
            length_penalty=f32(default(length_penalty, "length_penalty", 0.0)),
            min_waiting=jnp.asarray(default(min_waiting, "min_waiting", 1), jnp.int32),
            max_wait=jnp.asarray(default(max_wait, "max_wait", 0), jnp.int32),
            max_lengths_B=jnp.clip(jnp.asarray(max_lengths, jnp.int32), 0, n),
            input_lengths_B=None
            if prompt_lengths is None
            else jnp.asarray(prompt_lengths, jnp.int32),
            rng=jax.random.key(0) if rng is None else rng,
            confidence_params=confidence_params,
        )

    def __call__(self, params, inputs_BS, threshold=None, **options):
        config = self.spec.config
        check_tokens(inputs_BS, config.vocab_size, "inputs")
        inputs_BS = jnp.asarray(inputs_BS, jnp.int32)
        _check_prompt_lengths(
            options.get("prompt_lengths"), inputs_BS, config, self.spec.max_decode_len
        )
        opts = self.options(inputs_BS.shape[0], threshold, **options)
        return self.jitted(params, inputs_BS, opts)

    @property
    def trace_count(self) -> int:
        return TRACE_COUNTS[self.spec]


@functools.lru_cache(maxsize=256)
def _decoder(config, method_spec: Spec, max_decode_len: int) -> Decoder:
    return Decoder(config, method_spec, max_decode_len)


def _resolve_spec(spec: Spec | None, method: str | None, method_options: dict) -> Spec:
    if spec is not None:
        if method is not None or method_options:
            raise TypeError(
                "give either a spec or method=... with keyword options, not both "
                f"(got spec={spec!r}, method={method!r}, options {sorted(method_options)})"
            )
        return spec
    if method is None:
        raise TypeError("decode/make_decoder need a spec (e.g. FreeSpec()) or method=...")
    if "rollback_threshold" in method_options:  # decode's keyword for FreeSpec.rollback
        method_options["rollback"] = method_options.pop("rollback_threshold")
    return spec_for(method, **method_options)


def make_decoder(
    config, spec: Spec | None = None, *, max_decode_len: int, method: str | None = None,
    **method_options,
) -> Decoder:  # fmt: skip
    """The jitted decoder for `spec` (or `method=` plus `specs.spec_for` keywords); cached: equal
    arguments give the same object, and specs that differ only in traced values share one
    compiled function."""
    rollback = method_options.get("rollback")
    if isinstance(rollback, bool):  # make_decoder(method="free", rollback=True): value per call
        method_options["rollback"] = 0.0 if rollback else None
    return _decoder(config, _resolve_spec(spec, method, method_options), max_decode_len)


def decode(
    config,
    params,
    inputs_BS,
    spec: Spec | None = None,
    *,
    max_decode_len: int,
    method: str | None = None,
    threshold=None,
    prompt_lengths=None,
    max_lengths=None,
    confidence_params=None,
    rng=None,
    **method_options,
) -> DecodeResult | BeamResult:
    """Decodes a batch with any method and model family; see the module docstring.

    Args:
      config, params: the model (T5 or a decoder-only family).
      inputs_BS: [B, S] int token ids: T5 encoder tokens (0 is padding) or right-padded prompts.
      spec: a `specs` spec (`GreedySpec()`, `StaticSpec(k)`, `CalmSpec(...)`, `FreeSpec(...)`,
        `SampleSpec(...)`, `BeamSpec(...)`); or give `method=` and the spec's options as keywords
        (`specs.spec_for`: exit_layer, window, measure, rollback_threshold, records,
        position_temp, top_k, temperature, beam_size, length_penalty).
      max_decode_len: N, the output length.
      threshold: exit when confidence > threshold (CALM and FREE); a scalar, or one per exit
        for specs with many `exits`. Any real number: every measure lies in [-1, 1] (the softmax
        ones and entropy in [0, 1]), so below -1 always exits (below 0 for those) and 1 or more
        never exits; the tests and benchmarks use -1 and 2 for that. NaN or a non-number is a
        ValueError, raised before tracing. Fitted thresholds (`calibration.load_threshold`) lie
        in [0, 1], being probabilities (or are inf: never exit).
      prompt_lengths: [B] prompt lengths (decoder-only; None: every row is a whole prompt).
      max_lengths: optional [B] per-example maximum lengths (<= N).
      confidence_params: a `ConfidenceHead`'s parameters for measure "learned".
      rng: the sampling key.
    Returns:
      `DecodeResult` (`BeamResult` for beam search) with tokens [B, N] (0 after EOS), exit_layer
      and confidence [B, N], counters, and FREE's agreement records.
    """
    rollback_threshold = method_options.get("rollback_threshold")
    method_spec = _resolve_spec(spec, method, dict(method_options))
    decoder = _decoder(config, method_spec, max_decode_len)
    return decoder(
        params, inputs_BS, threshold, prompt_lengths=prompt_lengths, max_lengths=max_lengths,
        confidence_params=confidence_params, rng=rng,
        rollback_threshold=rollback_threshold,
    )  # fmt: skip
