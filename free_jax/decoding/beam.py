"""Full-model beam search (the honest baseline for quality).

K beams per example, flattened to B*K model rows. Each step expands every beam by every token and
keeps the K best by summed log-probability; a finished beam stays in the beam with one candidate
(pad, at no cost), so it competes with the live ones until the end. The final ranking divides by
the length penalty ((5 + length) / 6) ** alpha (Wu et al. 2016; alpha = 0 ranks by log-probability).
With K = 1 this is greedy decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from free_jax.decoding.state import BeamResult, BeamState, decode_setup


def _gather_beams(x_BK, beam_BK):
    """x_BK[..., beam] per example: x_BK is [B, K, ...], beam_BK [B, K] int."""
    idx = beam_BK.reshape(beam_BK.shape + (1,) * (x_BK.ndim - 2))
    return jnp.take_along_axis(x_BK, idx, axis=1)


def _reorder_cache(cache, flat_rows):
    # Any family's cache pytree (every leaf has the batch x beam rows first).
    return jax.tree.map(lambda x: x[flat_rows], cache)


def length_penalty_factor(length, alpha):
    """((5 + length) / 6) ** alpha."""
    return ((5.0 + length.astype(jnp.float32)) / 6.0) ** jnp.asarray(alpha, jnp.float32)


def beam_search(
    config,
    params,
    inputs_BS: jax.Array,
    *,
    beam_size: int,
    max_decode_len: int,
    input_lengths_B=None,
    length_penalty=0.0,
    max_lengths_B=None,
) -> BeamResult:
    """Beam search with `beam_size` (static) beams.

    Args:
      inputs_BS: [B, S] int32 encoder tokens, 0 is padding (T5), or right-padded prompts
        (decoder-only; prefilled once per example, then copied to every beam).
      max_decode_len: N, static.
      input_lengths_B: [B] prompt lengths (decoder-only).
      length_penalty: alpha, traced.
      max_lengths_B: optional [B] per-example maximum lengths.
    Returns:
      `BeamResult`: the best beam [B, N] and all beams [B, K, N] with their scores, best first.
    """
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    setup = decode_setup(
        config, params, inputs_BS, max_decode_len, max_lengths_B, input_lengths_B=input_lengths_B
    )
    model, b, n, k, v = setup.model, setup.batch, max_decode_len, beam_size, config.vocab_size
    num_layers = config.num_decoder_layers
    # every leaf of the context and the (prefilled) caches leads with B: rows b*K .. b*K+K-1
    expand = lambda tree: jax.tree_util.tree_map(lambda x: jnp.repeat(x, k, axis=0), tree)
    ctx, cache = expand(setup.ctx), expand(setup.cache)
    max_len_BK = jnp.repeat(setup.max_len_B[:, None], k, axis=1)
    # only beam 0 is alive at first, so the first expansion does not pick K copies of one token
    first_score_K = jnp.where(jnp.arange(k) == 0, 0.0, -jnp.inf)
    state = BeamState(
        step=jnp.zeros((), jnp.int32),
        last_token_BK=ctx.first_token_B.reshape(b, k),
        cache=cache,
        tokens_BKN=jnp.zeros((b, k, n), jnp.int32),
        logprob_BKN=jnp.zeros((b, k, n), jnp.float32),
        score_BK=jnp.broadcast_to(first_score_K, (b, k)).astype(jnp.float32),
        finished_BK=max_len_BK <= 0,
        length_BK=jnp.zeros((b, k), jnp.int32),
    )
    pad_only_V = jnp.where(jnp.arange(v) == config.pad_token_id, 0.0, -jnp.inf)

    def body(s: BeamState) -> BeamState:
        offset_R = ctx.base_B + s.step
        h_R1D = model.embed(s.last_token_BK.reshape(b * k, 1), offset_R)
        h_R1D, cache = model.layers(
            h_R1D, start=0, end=num_layers, cache=s.cache, context=ctx, offset_B=offset_R
        )
        logp_BKV = jax.nn.log_softmax(model.exit_logits(h_R1D[:, 0]), axis=-1).reshape(b, k, v)
        logp_BKV = jnp.where(s.finished_BK[..., None], pad_only_V, logp_BKV)
        candidates_BX = (s.score_BK[..., None] + logp_BKV).reshape(b, k * v)
        score_BK, index_BK = jax.lax.top_k(candidates_BX, k)
        beam_BK, token_BK = index_BK // v, (index_BK % v).astype(jnp.int32)
        token_logp_BK = jnp.take_along_axis(logp_BKV.reshape(b, k * v), index_BK, axis=1)
        parent_done_BK = _gather_beams(s.finished_BK, beam_BK)
        at_step_N = jnp.arange(n) == s.step
        tokens_BKN = jnp.where(at_step_N, token_BK[..., None], _gather_beams(s.tokens_BKN, beam_BK))
        logprob_BKN = jnp.where(
            at_step_N, token_logp_BK[..., None], _gather_beams(s.logprob_BKN, beam_BK)
        )
        flat_rows = (jnp.arange(b)[:, None] * k + beam_BK).reshape(-1)
        return BeamState(
            step=s.step + 1,
            last_token_BK=token_BK,
            cache=_reorder_cache(cache, flat_rows),
            tokens_BKN=tokens_BKN,
            logprob_BKN=logprob_BKN,
            score_BK=score_BK,
            finished_BK=parent_done_BK
            | (token_BK == config.eos_token_id)
            | (s.step + 1 >= max_len_BK),
            length_BK=_gather_beams(s.length_BK, beam_BK) + (~parent_done_BK).astype(jnp.int32),
        )

    final = jax.lax.while_loop(lambda s: (s.step < n) & ~jnp.all(s.finished_BK), body, state)
    normalised_BK = final.score_BK / length_penalty_factor(final.length_BK, length_penalty)
    order_BK = jnp.argsort(-normalised_BK, axis=1)
    beam_tokens = _gather_beams(final.tokens_BKN, order_BK)
    lengths_BK = _gather_beams(final.length_BK, order_BK)
    has_token_BN = jnp.arange(n)[None, :] < lengths_BK[:, 0:1]
    steps_B = jnp.max(final.length_BK, axis=1)
    return BeamResult(
        tokens=beam_tokens[:, 0],
        exit_layer=jnp.where(has_token_BN, num_layers, 0).astype(jnp.int32),
        confidence=jnp.where(has_token_BN, _gather_beams(final.logprob_BKN, order_BK)[:, 0], 0.0),
        lengths=lengths_BK[:, 0],
        num_deep_passes=steps_B,
        layers_computed=num_layers * steps_B,
        batch_layers_computed=num_layers * final.step,
        num_steps=final.step,
        beam_tokens=beam_tokens,
        beam_scores=_gather_beams(normalised_BK, order_BK),
    )
