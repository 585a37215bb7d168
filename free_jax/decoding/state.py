"""Loop states and results of every decoder, plus the small helpers they share.

Every decoder is a `jax.lax.while_loop` over one of the `flax.struct.dataclass` states below; shapes
never change inside the loop. Dimension keys: B batch, S input length (T5's source, a decoder-only
model's prompt), N `max_decode_len` (the output length), T cache length (N plus slack; plus S for
a decoder-only model), W FREE's window, D model width, K beams.

Positions: the loops count output positions n = 0..N-1; output position n of example b sits at
cache position `ctx.base_B[b] + n` (T5: base 0; decoder-only: the prompt length minus one), which
is the `offset_B` every model call receives.

Output layout, shared by all decoders (position n holds the n-th token after the decoder start
token, or after the prompt):

    tokens       [B, N]  int32   the tokens; 0 (pad) after EOS and after an example's max length
    exit_layer   [B, N]  int32   decoder layers behind each token (0 where there is no token)
    confidence   [B, N]  float32 the confidence each exit decision looked at (0 where no token)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from free_jax.models import DecoderCache
from free_jax.models.protocol import DecodeContext, bind

# ============================================================== results


@struct.dataclass
class AgreementRecords:
    """FREE's calibration data: one record per position that the deep layers verified.

    A record at position n says how confident the shallow exit was there and whether the shallow
    and deep predictions agreed (the adaptive threshold is fitted on these pairs).

    Attributes:
      confidence: [B, N] float32 shallow confidence at each position.
      agree: [B, N] bool, shallow argmax == deep argmax.
      valid: [B, N] bool, true where a deep pass produced a record.
    """

    confidence: jax.Array
    agree: jax.Array
    valid: jax.Array

    @classmethod
    def empty(cls, batch: int, length: int) -> AgreementRecords:
        return cls(
            confidence=jnp.zeros((batch, length), jnp.float32),
            agree=jnp.zeros((batch, length), bool),
            valid=jnp.zeros((batch, length), bool),
        )

    def pairs(self):
        """Flat numpy (confidence, agree) arrays of the valid records, for calibration."""
        import numpy as np

        valid = np.asarray(self.valid)
        return np.asarray(self.confidence)[valid], np.asarray(self.agree)[valid]


@struct.dataclass
class DecodeResult:
    """What every decoder returns.

    Attributes:
      tokens: [B, N] int32 tokens after the decoder start token; 0 after EOS.
      exit_layer: [B, N] int32 number of decoder layers behind each token (L for the full model,
        k for static exit, the exit layer for CALM, S or L for FREE); 0 where there is no token.
      confidence: [B, N] float32 the confidence the exit rule looked at for each token (FREE: the
        shallow exit's; CALM: the exit layer's; greedy/static: the exit's); 0 where no token.
      lengths: [B] int32 tokens produced, EOS included.
      num_deep_passes: [B] int32 times the deep layers ran for this example (greedy: every token;
        CALM: tokens that reached the last layer; FREE: parallel passes it took part in).
      layers_computed: [B] int32 decoder layers run for this example, a parallel pass over several
        positions counting once per layer (CALM's copied key/values are not counted).
      batch_layers_computed: [] int32 decoder layers the batch ran as a whole (a layer run for
        any example counts once): the compute actually spent.
      num_steps: [] int32 loop iterations.
      records: FREE's `AgreementRecords` (all invalid for the other decoders).
      num_rollbacks: [B] int32 FREE rollbacks (rejected shallow tokens); 0 elsewhere.
      pass_width_counts: [P] int32, FREE: how many deep passes the batch ran at each static width
        of `pass_widths(W)` (P of them; a pass costs its width, see the benchmark); [0] elsewhere.
      num_served: [B] int32, FREE: passes that resolved a position of this example's that needed
        the deep layers (with deferral, after waiting); 0 elsewhere.
      wait_steps: [B] int32, FREE: shallow steps this example spent waiting for a pass, in all.
      max_wait: [B] int32, FREE: its longest single wait.
    """

    tokens: jax.Array
    exit_layer: jax.Array
    confidence: jax.Array
    lengths: jax.Array
    num_deep_passes: jax.Array
    layers_computed: jax.Array
    batch_layers_computed: jax.Array
    num_steps: jax.Array
    records: AgreementRecords
    num_rollbacks: jax.Array
    pass_width_counts: jax.Array
    num_served: jax.Array
    wait_steps: jax.Array
    max_wait: jax.Array

    def exit_rate(self, deep_layer: int):
        """Fraction of produced tokens whose exit layer is below `deep_layer` (numpy float)."""
        import numpy as np

        exit_layer = np.asarray(self.exit_layer)
        produced = exit_layer > 0
        return float((produced & (exit_layer < deep_layer)).sum() / max(produced.sum(), 1))


@struct.dataclass
class BeamResult:
    """Beam search output: the best beam in `DecodeResult` layout plus every beam.

    Attributes:
      tokens: [B, N] int32 the best beam by length-normalised log-probability.
      exit_layer, confidence, lengths, num_deep_passes, layers_computed, batch_layers_computed,
        num_steps: as in `DecodeResult` (confidence is the token's log-probability).
      beam_tokens: [B, K, N] int32 every beam, best first.
      beam_scores: [B, K] float32 length-normalised scores, best first.
    """

    tokens: jax.Array
    exit_layer: jax.Array
    confidence: jax.Array
    lengths: jax.Array
    num_deep_passes: jax.Array
    layers_computed: jax.Array
    batch_layers_computed: jax.Array
    num_steps: jax.Array
    beam_tokens: jax.Array
    beam_scores: jax.Array


# ================================================================ states


@struct.dataclass
class TokenLog:
    """The per-position outputs being filled in: see the module docstring for the layout.

    Attributes:
      tokens: [B, N] int32.
      exit_layer: [B, N] int32.
      confidence: [B, N] float32.
    """

    tokens: jax.Array
    exit_layer: jax.Array
    confidence: jax.Array

    @classmethod
    def empty(cls, batch: int, length: int) -> TokenLog:
        return cls(
            tokens=jnp.zeros((batch, length), jnp.int32),
            exit_layer=jnp.zeros((batch, length), jnp.int32),
            confidence=jnp.zeros((batch, length), jnp.float32),
        )

    def write(self, pos_B, write_B, token_B, exit_layer_B, confidence_B) -> TokenLog:
        """Writes each example's token at its position `pos_B[b]` where `write_B[b]`.

        >>> log = TokenLog.empty(2, 3).write(jnp.array([0, 2]), jnp.array([True, False]),
        ...     jnp.array([7, 8]), jnp.array([4, 4]), jnp.array([.5, .5]))
        >>> log.tokens
        Array([[7, 0, 0],
               [0, 0, 0]], dtype=int32)
        """
        hit_BN = position_mask(pos_B, self.tokens.shape[1]) & write_B[:, None]
        put = lambda old, new: jnp.where(hit_BN, new[:, None].astype(old.dtype), old)
        return TokenLog(
            tokens=put(self.tokens, token_B),
            exit_layer=put(self.exit_layer, exit_layer_B),
            confidence=put(self.confidence, confidence_B),
        )

    def lengths(self) -> jax.Array:
        """[B] tokens produced: positions with a nonzero exit layer."""
        return jnp.sum(self.exit_layer > 0, axis=1).astype(jnp.int32)


@struct.dataclass
class SingleExitState:
    """Greedy / sampling / static-exit loop: one exit, every example at the same position.

    Attributes:
      step: [] int32 position being decoded.
      last_token_B: [B] int32 the decoder input at `step` (start token, then the last output).
      cache: `DecoderCache` of [B, H, T, K] per layer (only the layers below the exit).
      log: `TokenLog` of [B, N] outputs.
      done_B: [B] bool, finished (EOS emitted or max length reached).
      batch_layers: [] int32 layers run for the batch.
      layers_B: [B] int32 layers run per example while it was unfinished.
    """

    step: jax.Array
    last_token_B: jax.Array
    cache: DecoderCache
    log: TokenLog
    done_B: jax.Array
    batch_layers: jax.Array
    layers_B: jax.Array


@struct.dataclass
class CalmState:
    """CALM loop: every example at the same position, a per-example exit layer each step.

    Attributes:
      step: [] int32 position being decoded.
      last_token_B: [B] int32 decoder input at `step`.
      cache: `DecoderCache` [B, H, T, K] per layer; skipped layers hold copied key/values.
      log: `TokenLog` of [B, N] outputs.
      done_B: [B] bool.
      deep_B: [B] int32 tokens that ran every layer.
      layers_B: [B] int32 layers run per example.
      batch_layers: [] int32 layers run for the batch (layer l counts when any example ran it).
    """

    step: jax.Array
    last_token_B: jax.Array
    cache: DecoderCache
    log: TokenLog
    done_B: jax.Array
    deep_B: jax.Array
    layers_B: jax.Array
    batch_layers: jax.Array


@struct.dataclass
class FreeState:
    """FREE's synchronized parallel decoding loop; each example at its own position.

    The stack holds, per example, the layer-S input hidden states of the positions
    `[pos_B - stack_len_B, pos_B)` that exited early and whose deep key/values are not yet computed.
    Slot w of `stack_BWD` is position `pos_B - stack_len_B + w`.

    Attributes:
      pos_B: [B] int32 position decoded next (positions before it hold tokens).
      last_token_B: [B] int32 decoder input at `pos_B`.
      cache: `DecoderCache` [B, H, T, K] per layer, T = N + W (+ S); deep layers hold exact
        key/values for output positions before `pos_B - stack_len_B`, shallow layers for those
        before `pos_B` (and, for a decoder-only model, every layer for the prompt).
      stack_BWD: [B, W, D] stacked hidden states, each at its frontier: the input of the exit
        layer it was carried to (layer S with one exit; compute dtype).
      stack_exit_BW: [B, W] int32 each slot's frontier, as an index into the exits (always 0
        with one exit); non-increasing along the stack.
      stack_len_B: [B] int32 stacked positions, at most W - 1.
      log: `TokenLog` of [B, N] outputs.
      records: `AgreementRecords` [B, N].
      done_B: [B] bool.
      deep_B: [B] int32 deep passes the example took part in.
      layers_B: [B] int32 layers run per example (a pass counts L - S whatever its width).
      rollbacks_B: [B] int32 rejected shallow tokens.
      batch_layers: [] int32 layers run for the batch.
      iterations: [] int32 shallow steps taken (a step that needed a pass counts once).
      width_counts_P: [P] int32 deep passes run at each static width (P = len(pass_widths(W))).
      wait_B: [B] int32 shallow steps the example's current position has waited for a pass
        (deferral: it holds its position, recomputing its shallow step identically; 0 otherwise).
      served_B: [B] int32 passes that resolved a position of the example that needed them.
      waited_B: [B] int32 total shallow steps waited; longest_wait_B: [B] int32 its longest wait.
      pending: [] bool, the last shallow step needs a deep pass that has not run yet; the
        fields below hold that step's shallow outputs (its position is `pos_B`, its layer-S
        input already sits in stack slot `stack_len_B`).
      shallow_token_B: [B] int32 the pending step's shallow argmax.
      shallow_conf_B: [B] float32 its shallow confidence.
      exit_B: [B] bool, its confidence cleared the threshold.
    """

    pos_B: jax.Array
    last_token_B: jax.Array
    cache: DecoderCache
    stack_BWD: jax.Array
    stack_exit_BW: jax.Array
    stack_len_B: jax.Array
    log: TokenLog
    records: AgreementRecords
    done_B: jax.Array
    deep_B: jax.Array
    layers_B: jax.Array
    rollbacks_B: jax.Array
    batch_layers: jax.Array
    iterations: jax.Array
    width_counts_P: jax.Array
    wait_B: jax.Array
    served_B: jax.Array
    waited_B: jax.Array
    longest_wait_B: jax.Array
    pending: jax.Array
    shallow_token_B: jax.Array
    shallow_conf_B: jax.Array
    exit_B: jax.Array


@struct.dataclass
class BeamState:
    """Beam search loop over B examples times K beams, flattened to B*K rows for the model.

    Attributes:
      step: [] int32 position being decoded.
      last_token_BK: [B, K] int32 decoder inputs.
      cache: `DecoderCache` [B*K, H, T, K] per layer, rows ordered example-major.
      tokens_BKN: [B, K, N] int32 each beam's tokens so far.
      logprob_BKN: [B, K, N] float32 each token's log-probability.
      score_BK: [B, K] float32 summed log-probability.
      finished_BK: [B, K] bool.
      length_BK: [B, K] int32 tokens in each beam, EOS included.
    """

    step: jax.Array
    last_token_BK: jax.Array
    cache: DecoderCache
    tokens_BKN: jax.Array
    logprob_BKN: jax.Array
    score_BK: jax.Array
    finished_BK: jax.Array
    length_BK: jax.Array


# ============================================================== helpers


class DecodeSetup(NamedTuple):
    """What a decoder computes before its loop (trace-time values, not loop state).

    Attributes:
      model: the bound model (anything with the `DecodingModel` methods).
      ctx: its `DecodeContext` (first input token and base cache position per example, plus the
        family's memory, e.g. T5's encoder output).
      cache: the caches `model.start` returned: prompt positions prefilled (decoder-only),
        `cache_length` more positions free, `num_layers` layers.
      batch, length: B and N (`max_decode_len`).
      max_len_B: [B] int32 per-example maximum lengths, clipped to N.
    """

    model: Any
    ctx: DecodeContext
    cache: DecoderCache
    batch: int
    length: int
    max_len_B: jax.Array


def decode_setup(
    config,
    params,
    inputs_BS: jax.Array,
    max_decode_len: int,
    max_lengths_B=None,
    *,
    input_lengths_B=None,
    slack: int = 0,
    num_layers: int | None = None,
) -> DecodeSetup:
    """Binds the model, builds its context from the inputs (T5: encodes them; decoder-only:
    prefills the prompts) and resolves the per-example maximum lengths.

    Args:
      inputs_BS: [B, S] int32 encoder tokens (T5) or right-padded prompts (decoder-only).
      input_lengths_B: [B] prompt lengths (decoder-only; None: every row is a full prompt).
      slack: cache positions beyond the N decoded ones (FREE's window).
      num_layers: cache only the first layers (static exit); None: all.
    """
    model = bind(config, params)
    b = inputs_BS.shape[0]
    ctx, cache = model.start(
        inputs_BS, input_lengths_B, extra_length=max_decode_len + slack, num_layers=num_layers
    )
    return DecodeSetup(
        model=model,
        ctx=ctx,
        cache=cache,
        batch=b,
        length=max_decode_len,
        max_len_B=resolve_max_lengths(max_lengths_B, b, max_decode_len),
    )


def start_fields(setup: DecodeSetup) -> dict[str, jax.Array]:
    """The fields every one-sequence-per-example state starts from: the first decoder input as
    the last token [B], an empty `TokenLog` [B, N], and done [B] where the maximum length is 0."""
    batch, length, max_len_B = setup.batch, setup.length, setup.max_len_B
    return dict(
        last_token_B=setup.ctx.first_token_B,
        log=TokenLog.empty(batch, length),
        done_B=max_len_B <= 0,
    )


def position_mask(pos_B: jax.Array, length: int) -> jax.Array:
    """[B, length] one-hot of each example's position (all false when it is out of range)."""
    return jnp.arange(length, dtype=jnp.int32)[None, :] == pos_B[:, None]


def resolve_max_lengths(max_lengths_B, batch: int, max_decode_len: int) -> jax.Array:
    """[B] int32 per-example maximum lengths, clipped to `max_decode_len` (None: all of it)."""
    if max_lengths_B is None:
        return jnp.full((batch,), max_decode_len, jnp.int32)
    return jnp.clip(jnp.asarray(max_lengths_B, jnp.int32), 0, max_decode_len)


def result_from_log(log: TokenLog, **counters) -> DecodeResult:
    """Assembles a `DecodeResult`; counters not given default to zeros."""
    b, n = log.tokens.shape
    zeros_B = jnp.zeros((b,), jnp.int32)
    fields = dict(
        num_deep_passes=zeros_B,
        layers_computed=zeros_B,
        batch_layers_computed=jnp.zeros((), jnp.int32),
        num_steps=jnp.zeros((), jnp.int32),
        records=AgreementRecords.empty(b, n),
        num_rollbacks=zeros_B,
        pass_width_counts=jnp.zeros((0,), jnp.int32),
        num_served=zeros_B,
        wait_steps=zeros_B,
        max_wait=zeros_B,
    )
    fields.update(counters)
    return DecodeResult(
        tokens=log.tokens,
        exit_layer=log.exit_layer,
        confidence=log.confidence,
        lengths=log.lengths(),
        **fields,
    )


def run_layers(model, hidden_BCD, start: int, end: int, *, cache, ctx, offset_B, need_prev):
    """Decoder layers [start, end) on a chunk whose first row sits at cache position `offset_B`;
    returns (hidden, hidden one layer earlier, cache).

    The earlier hidden state (input of layer end-1) is only computed apart when `need_prev`
    (the "hidden_cosine" measure); otherwise it is None and the layers run as one call.
    """
    kw = dict(context=ctx, offset_B=offset_B)
    if not need_prev:
        hidden_BCD, cache = model.layers(hidden_BCD, start=start, end=end, cache=cache, **kw)
        return hidden_BCD, None, cache
    prev_BCD = hidden_BCD
    if end - 1 > start:
        prev_BCD, cache = model.layers(hidden_BCD, start=start, end=end - 1, cache=cache, **kw)
    hidden_BCD, cache = model.layers(prev_BCD, start=end - 1, end=end, cache=cache, **kw)
    return hidden_BCD, prev_BCD, cache
