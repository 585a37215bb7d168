"""Decoders: greedy, sampling, beam search, static exit, CALM, FREE (+ rollback, lossless),
over any model family behind `free_jax.models.protocol`; one frozen spec per method (`specs.py`).

All are pure functions around a `jax.lax.while_loop` over a struct dataclass state, jitted once
per static configuration; the exit threshold is traced. Most users want `decode` (or
`make_decoder` for a jitted function to time).
"""

from free_jax.decoding.api import METHODS, Decoder, DecoderSpec, decode, make_decoder
from free_jax.decoding.beam import beam_search
from free_jax.decoding.calm import calm_decode
from free_jax.decoding.confidence import (
    MEASURES,
    ConfidenceHead,
    decayed_threshold,
    hidden_cosine,
    init_confidence_head,
    learned_confidence,
    softmax_margin,
    softmax_max,
)
from free_jax.decoding.depthwise import DepthwiseResult, depthwise_decode
from free_jax.decoding.free import (
    free_bound,
    free_decode,
    free_loop,
    free_lossless_decode,
    pass_widths,
)
from free_jax.decoding.greedy import greedy_decode, sample_decode
from free_jax.decoding.specs import (
    BeamSpec,
    CalmSpec,
    DepthwiseSpec,
    FreeSpec,
    GreedySpec,
    SampleSpec,
    Spec,
    StaticSpec,
    spec_for,
)
from free_jax.decoding.state import AgreementRecords, BeamResult, DecodeResult
from free_jax.decoding.static import static_decode

__all__ = [
    "MEASURES",
    "METHODS",
    "AgreementRecords",
    "BeamResult",
    "BeamSpec",
    "CalmSpec",
    "DepthwiseResult",
    "DepthwiseSpec",
    "FreeSpec",
    "GreedySpec",
    "SampleSpec",
    "Spec",
    "StaticSpec",
    "spec_for",
    "ConfidenceHead",
    "DecodeResult",
    "Decoder",
    "DecoderSpec",
    "beam_search",
    "depthwise_decode",
    "calm_decode",
    "decayed_threshold",
    "decode",
    "free_bound",
    "free_decode",
    "free_lossless_decode",
    "free_loop",
    "greedy_decode",
    "hidden_cosine",
    "init_confidence_head",
    "learned_confidence",
    "make_decoder",
    "pass_widths",
    "sample_decode",
    "softmax_margin",
    "softmax_max",
    "static_decode",
]
