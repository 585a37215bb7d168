"""`decode`: one entry point for every decoder, jitted once per static configuration.

    result = decode(config, params, encoder_tokens_BS, method="free", max_decode_len=64,
                    threshold=0.9)
    result.tokens, result.exit_layer, result.confidence   # [B, 64] each
    result.records.pairs()                                # FREE's (confidence, agree) pairs

Static (a new value compiles once): the config, the method, max_decode_len, exit_layer, window,
the confidence measure, whether FREE rolls back, top_k, beam_size, and the input shapes.
Traced (a new value never recompiles): params, the encoder tokens, threshold, position_temp,
rollback_threshold, per-example max lengths, temperature, length_penalty, the sampling key and the
learned confidence head's parameters.

For timing, `make_decoder(...)` returns the jitted `Decoder` itself:

    run = make_decoder(config, method="free", max_decode_len=64, window=8)
    run(params, encoder_tokens_BS, 0.9).tokens.block_until_ready()
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

from free_jax.decoding.beam import beam_search
from free_jax.decoding.calm import calm_decode
from free_jax.decoding.confidence import check_measure
from free_jax.decoding.free import free_decode
from free_jax.decoding.greedy import greedy_decode, sample_decode
from free_jax.decoding.state import BeamResult, DecodeResult
from free_jax.decoding.static import static_decode
from free_jax.models import T5Config
from free_jax.models.t5 import check_tokens

METHODS = ("greedy", "sample", "beam", "static", "calm", "free", "free_lossless")
_NEEDS_THRESHOLD = ("calm", "free", "free_lossless")

# How many times each static configuration was traced (a retrace means a recompile).
TRACE_COUNTS: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """Everything static about a decoder (hashable, holds no arrays).

    Attributes:
      config: the model config.
      method: one of `METHODS`.
      max_decode_len: N.
      exit_layer: static exit k; CALM's minimum exit layer; FREE's S (None: config.shallow_layer).
      window: FREE's W.
      measure: confidence measure (`confidence.MEASURES`).
      rollback: FREE rolls back (the threshold is given per call as `rollback_threshold`).
      records: FREE keeps its agreement records (False: a cheaper deep exit, plain FREE only).
      top_k: sampling's top-k (0: the whole vocabulary).
      beam_size: beam search's K.
    """

    config: T5Config
    method: str
    max_decode_len: int
    exit_layer: int | None = None
    window: int = 8
    measure: str = "softmax_margin"
    rollback: bool = False
    records: bool = True
    top_k: int = 0
    beam_size: int = 4

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown decoding method {self.method!r}; expected one of {METHODS}")
        if self.max_decode_len < 1:
            raise ValueError(f"max_decode_len must be >= 1, got {self.max_decode_len}")
        check_measure(self.measure)
        if self.method == "static" and self.exit_layer is None:
            raise ValueError("method 'static' needs exit_layer=k")
        if self.exit_layer is not None and self.method in (
            "static",
            "calm",
            "free",
            "free_lossless",
        ):
            self.config.check_exit_layer(self.exit_layer, what=f"{self.method} exit_layer")
        if self.method in ("free", "free_lossless") and self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.rollback and self.method != "free":
            raise ValueError("rollback applies to method 'free' only")


@struct.dataclass
class TracedOptions:
    """Per-call values, traced (shapes fixed per spec and batch).

    Attributes:
      threshold, position_temp, rollback_threshold, temperature, length_penalty: [] float32.
      max_lengths_B: [B] int32.
      rng: a PRNG key (sampling).
      confidence_params: `ConfidenceHead` parameters, or None.
    """

    threshold: jax.Array
    position_temp: jax.Array
    rollback_threshold: jax.Array
    temperature: jax.Array
    length_penalty: jax.Array
    max_lengths_B: jax.Array
    rng: jax.Array
    confidence_params: Any = None


def _run(spec: DecoderSpec, params, encoder_tokens_BS, options: TracedOptions):
    TRACE_COUNTS[spec] += 1  # runs at trace time only
    c, n = spec.config, spec.max_decode_len
    common = dict(
        max_decode_len=n,
        max_lengths_B=options.max_lengths_B,
    )
    scored = dict(common, measure=spec.measure, confidence_params=options.confidence_params)
    if spec.method == "greedy":
        return greedy_decode(c, params, encoder_tokens_BS, **scored)
    if spec.method == "sample":
        return sample_decode(
            c, params, encoder_tokens_BS, rng=options.rng, temperature=options.temperature,
            top_k=spec.top_k, **scored,
        )  # fmt: skip
    if spec.method == "beam":
        return beam_search(
            c, params, encoder_tokens_BS, beam_size=spec.beam_size,
            length_penalty=options.length_penalty, **common,
        )  # fmt: skip
    if spec.method == "static":
        return static_decode(c, params, encoder_tokens_BS, exit_layer=spec.exit_layer, **scored)
    if spec.method == "calm":
        return calm_decode(
            c, params, encoder_tokens_BS, options.threshold, min_exit_layer=spec.exit_layer or 1,
            position_temp=options.position_temp, **scored,
        )  # fmt: skip
    if spec.exit_layer is not None:
        c = c.replace(shallow_exit_layer=spec.exit_layer)
    if spec.method == "free_lossless":
        mode = "lossless"
    else:
        mode = "rollback" if spec.rollback else "plain"
    return free_decode(
        c, params, encoder_tokens_BS, options.threshold, window=spec.window, mode=mode,
        rollback_threshold=options.rollback_threshold, position_temp=options.position_temp,
        records=spec.records, **scored,
    )  # fmt: skip


class Decoder:
    """A decoder jitted for one `DecoderSpec`: `decoder(params, encoder_tokens_BS, threshold)`."""

    def __init__(self, spec: DecoderSpec):
        self.spec = spec
        self.jitted = jax.jit(functools.partial(_run, spec))

    def options(
        self,
        batch: int,
        threshold=None,
        *,
        position_temp=0.0,
        rollback_threshold=None,
        max_lengths=None,
        confidence_params=None,
        rng=None,
        temperature=1.0,
        length_penalty=0.0,
    ) -> TracedOptions:
        spec = self.spec
        if spec.method in _NEEDS_THRESHOLD and threshold is None:
            raise ValueError(f"method {spec.method!r} needs a threshold")
        if spec.rollback and rollback_threshold is None:
            raise ValueError("a rolling-back FREE decoder needs rollback_threshold")
        if spec.measure == "learned" and confidence_params is None:
            raise ValueError("measure 'learned' needs confidence_params (a ConfidenceHead's)")
        if max_lengths is None:
            max_lengths = np.full((batch,), spec.max_decode_len, np.int32)
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return TracedOptions(
            threshold=f32(0.0 if threshold is None else threshold),
            position_temp=f32(position_temp),
            rollback_threshold=f32(np.inf if rollback_threshold is None else rollback_threshold),
            temperature=f32(temperature),
            length_penalty=f32(length_penalty),
            max_lengths_B=jnp.clip(jnp.asarray(max_lengths, jnp.int32), 0, spec.max_decode_len),
            rng=jax.random.key(0) if rng is None else rng,
            confidence_params=confidence_params,
        )

    def __call__(self, params, encoder_tokens_BS, threshold=None, **options):
        check_tokens(encoder_tokens_BS, self.spec.config.vocab_size, "encoder_tokens")
        encoder_tokens_BS = jnp.asarray(encoder_tokens_BS, jnp.int32)
        opts = self.options(encoder_tokens_BS.shape[0], threshold, **options)
        return self.jitted(params, encoder_tokens_BS, opts)

    @property
    def trace_count(self) -> int:
        return TRACE_COUNTS[self.spec]


@functools.lru_cache(maxsize=256)
def _decoder(spec: DecoderSpec) -> Decoder:
    return Decoder(spec)


def make_decoder(
    config: T5Config,
    *,
    method: str,
    max_decode_len: int,
    exit_layer: int | None = None,
    window: int = 8,
    measure: str = "softmax_margin",
    rollback: bool = False,
    records: bool = True,
    top_k: int = 0,
    beam_size: int = 4,
) -> Decoder:
    """The jitted decoder for a static configuration (cached: equal arguments, same object)."""
    return _decoder(
        DecoderSpec(
            config=config, method=method, max_decode_len=max_decode_len, exit_layer=exit_layer,
            window=window, measure=measure, rollback=rollback, records=records, top_k=top_k,
            beam_size=beam_size,
        )
    )  # fmt: skip


def decode(
    config: T5Config,
    params,
    encoder_tokens_BS,
    *,
    method: str,
    max_decode_len: int,
    threshold=None,
    exit_layer: int | None = None,
    window: int = 8,
    measure: str = "softmax_margin",
    rollback_threshold=None,
    position_temp=0.0,
    records: bool = True,
    max_lengths=None,
    confidence_params=None,
    rng=None,
    temperature=1.0,
    top_k: int = 0,
    beam_size: int = 4,
    length_penalty=0.0,
) -> DecodeResult | BeamResult:
    """Decodes a batch with any method; see the module docstring.

    Args:
      config, params: the model.
      encoder_tokens_BS: [B, S] int token ids, 0 is padding.
      method: "greedy", "sample", "beam", "static", "calm", "free" or "free_lossless".
      max_decode_len: N, the output length.
      threshold: exit when confidence > threshold (calm, free, free_lossless).
      exit_layer: k for static; the minimum exit layer for calm (default 1); S for free
        (default config.shallow_layer).
      window: FREE's W, the most positions in one deep pass.
      measure: "softmax_margin" (default), "softmax_max", "hidden_cosine" or "learned".
      rollback_threshold: FREE's rollback policy (method "free"): reject a shallow token whose
        deep cross-entropy exceeds it. None: no rollback.
      position_temp: CALM's threshold decay over positions (0: none).
      records: FREE keeps its agreement records (default); False makes plain FREE's deep exit
        read only the current position.
      max_lengths: optional [B] per-example maximum lengths (<= N).
      confidence_params: a `ConfidenceHead`'s parameters for measure "learned".
      rng, temperature, top_k: sampling.
      beam_size, length_penalty: beam search.
    Returns:
      `DecodeResult` (`BeamResult` for beam search) with tokens [B, N] (0 after EOS), exit_layer
      and confidence [B, N], counters, and FREE's agreement records.
    """
    decoder = make_decoder(
        config, method=method, max_decode_len=max_decode_len, exit_layer=exit_layer,
        window=window, measure=measure, rollback=rollback_threshold is not None,
        records=records, top_k=top_k, beam_size=beam_size,
    )  # fmt: skip
    return decoder(
        params, encoder_tokens_BS, threshold, position_temp=position_temp,
        rollback_threshold=rollback_threshold, max_lengths=max_lengths,
        confidence_params=confidence_params, rng=rng, temperature=temperature,
        length_penalty=length_penalty,
    )  # fmt: skip
