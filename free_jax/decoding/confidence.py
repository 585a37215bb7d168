"""Confidence measures and the exit rule.

A token leaves at an exit when its confidence is strictly greater than the threshold (a tie goes
on). The threshold is a traced value, so trying a new one never recompiles a decoder.

Measures (the `measure` names decoders accept):
  "softmax_margin"  softmax top-1 minus top-2 probability of the exit's logits (FREE's default).
  "softmax_max"     softmax top-1 probability.
  "hidden_cosine"   cosine between the hidden states after this layer and after the one before
                    (CALM's state saturation; before layer 1 the decoder input embedding).
  "learned"         a small classifier on the exit's normalised hidden state that predicts
                    "this exit agrees with the deep exit" (`ConfidenceHead`, trained by
                    `free_jax.training.confidence_head`); the confidence is P(agree).
  "entropy"         1 - H(softmax) / log(V): the exit's entropy (Valade 2024's measure for
                    self-supervised exit heads), normalised so that 1 is a one-hot distribution
                    and 0 the uniform one; higher is more confident, like every measure here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

MEASURES = ("softmax_margin", "softmax_max", "hidden_cosine", "learned", "entropy")


def check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise ValueError(f"unknown confidence measure {measure!r}; expected one of {MEASURES}")


# ============================================================== measures


def _top2_and_logsumexp(logits_BV: jax.Array):
    """(top-1 logit, top-2 logit, logsumexp), each [B], with two reductions instead of a sort."""
    logits_BV = logits_BV.astype(jnp.float32)
    top1_B = jnp.max(logits_BV, axis=-1)
    first_B = jnp.argmax(logits_BV, axis=-1)
    is_first_BV = jnp.arange(logits_BV.shape[-1])[None, :] == first_B[:, None]
    top2_B = jnp.max(jnp.where(is_first_BV, -jnp.inf, logits_BV), axis=-1)
    lse_B = top1_B + jnp.log(jnp.sum(jnp.exp(logits_BV - top1_B[:, None]), axis=-1))
    return top1_B, top2_B, lse_B


def softmax_margin(logits_BV: jax.Array) -> jax.Array:
    """[B] softmax top-1 minus top-2 probability (FREE's measure).

    >>> float(softmax_margin(jnp.log(jnp.array([[0.6, 0.3, 0.1]])))[0])  # doctest: +ELLIPSIS
    0.3...
    """
    top1_B, top2_B, lse_B = _top2_and_logsumexp(logits_BV)
    return jnp.exp(top1_B - lse_B) - jnp.exp(top2_B - lse_B)


def softmax_max(logits_BV: jax.Array) -> jax.Array:
    """[B] softmax top-1 probability."""
    logits_BV = logits_BV.astype(jnp.float32)
    return jnp.exp(jnp.max(logits_BV, axis=-1) - jax.nn.logsumexp(logits_BV, axis=-1))


def normalized_entropy_confidence(logits_BV: jax.Array) -> jax.Array:
    """[B] 1 - H(p) / log(V) of p = softmax(logits): 1 when one-hot, 0 when uniform.

    Dividing by log(V) keeps thresholds in [0, 1] and comparable across vocabularies.

    >>> conf = normalized_entropy_confidence(jnp.log(jnp.array([[0.25, 0.25, 0.25, 0.25],
    ...                                                       [0.5, 0.5, 1e-30, 1e-30]])))
    >>> [round(float(c), 4) for c in conf]   # uniform over 4; two of 4 tokens: 1 - log 2 / log 4
    [0.0, 0.5]
    """
    logits_BV = logits_BV.astype(jnp.float32)
    log_p_BV = jax.nn.log_softmax(logits_BV, axis=-1)
    # p * log p with p = 0 is 0 (jnp.where keeps -inf logits from making NaN).
    plogp_BV = jnp.where(log_p_BV > -jnp.inf, jnp.exp(log_p_BV) * log_p_BV, 0.0)
    entropy_B = -jnp.sum(plogp_BV, axis=-1)
    return 1.0 - entropy_B / jnp.log(jnp.float32(logits_BV.shape[-1]))


def hidden_cosine(prev_hidden_BD: jax.Array, hidden_BD: jax.Array) -> jax.Array:
    """[B] cosine similarity of consecutive layers' hidden states, per example."""
    a = prev_hidden_BD.astype(jnp.float32)
    b = hidden_BD.astype(jnp.float32)
    dot = jnp.sum(a * b, axis=-1)
    return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), 1e-12)


class ConfidenceHead(nn.Module):
    """Two-layer classifier: normalised hidden [.., D] -> logits [.., 2] for (disagree, agree).

    Shaped like the FREE reference's "meta" head (D -> D, ReLU, D -> 2).
    """

    hidden_dim: int

    @nn.compact
    def __call__(self, normed_BD: jax.Array) -> jax.Array:
        h = nn.relu(nn.Dense(self.hidden_dim, name="hidden")(normed_BD.astype(jnp.float32)))
        return nn.Dense(2, name="out")(h)


def init_confidence_head(d_model: int, rng: jax.Array):
    """Random `ConfidenceHead` parameters for a model of width `d_model`."""
    return ConfidenceHead(d_model).init(rng, jnp.zeros((1, d_model)))["params"]


def learned_confidence(head_params, normed_BD: jax.Array) -> jax.Array:
    """[B] P(agree) from a `ConfidenceHead`."""
    hidden_dim = head_params["hidden"]["kernel"].shape[1]
    logits = ConfidenceHead(hidden_dim).apply({"params": head_params}, normed_BD)
    return jax.nn.softmax(logits, axis=-1)[..., 1]


# ============================================================== exit rule


# Measures that read the exit's hidden state only, never its vocabulary distribution.
HIDDEN_MEASURES = ("hidden_cosine", "learned")


def hidden_confidence(model, measure: str, hidden_BD, prev_hidden_BD=None, head_params=None):
    """[B] confidence of a measure in `HIDDEN_MEASURES`, without computing the exit's logits
    (a decoder can then pay the LM head only where a token leaves)."""
    if measure == "hidden_cosine":
        if prev_hidden_BD is None:
            raise ValueError("hidden_cosine needs the previous layer's hidden state")
        return hidden_cosine(prev_hidden_BD, hidden_BD)
    if measure == "learned":
        if head_params is None:
            raise ValueError("the 'learned' measure needs confidence_params (ConfidenceHead)")
        return learned_confidence(head_params, model.final_norm(hidden_BD))
    raise ValueError(f"{measure!r} reads the exit's logits; use exit_confidence")


def exit_confidence(
    model, measure: str, hidden_BD, prev_hidden_BD=None, head_params=None, *, layer=None
):
    """Logits [B, V] (float32) of an exit and its confidence [B] under `measure`.

    Args:
      model: a bound model (`free_jax.models.protocol.DecodingModel`).
      hidden_BD: hidden state after the exit's last layer (before the final norm).
      prev_hidden_BD: hidden state one layer earlier (only "hidden_cosine" reads it).
      head_params: `ConfidenceHead` parameters (only "learned" reads them).
      layer: the decoder layer the exit sits after (a model with exit heads answers with the
        head on that layer; others ignore it).
    """
    logits_BV = model.exit_logits(hidden_BD, layer=layer)
    if measure == "softmax_margin":
        conf_B = softmax_margin(logits_BV)
    elif measure == "softmax_max":
        conf_B = softmax_max(logits_BV)
    elif measure == "entropy":
        conf_B = normalized_entropy_confidence(logits_BV)
    elif measure in HIDDEN_MEASURES:
        conf_B = hidden_confidence(model, measure, hidden_BD, prev_hidden_BD, head_params)
    else:
        check_measure(measure)
    return logits_BV, conf_B


def decayed_threshold(threshold, position_B, max_decode_len: int, temperature=0.0):
    """CALM's position-decayed threshold, per example.

    thr_t = thr * exp(-temperature * t / N) / 10 + 9 * thr / 10, with t the 1-based index of the
    token being produced and N = max_decode_len; temperature 0 returns `threshold` exactly.
    """
    threshold = jnp.asarray(threshold, jnp.float32)
    temperature = jnp.asarray(temperature, jnp.float32)
    t_B = position_B.astype(jnp.float32)
    decayed = threshold * jnp.exp(-temperature * t_B / max_decode_len) / 10 + 9 * threshold / 10
    return jnp.where(temperature == 0, threshold, decayed)


def exits(conf_B: jax.Array, threshold_B) -> jax.Array:
    """[B] bool: leave here. Strictly greater: a confidence equal to the threshold goes deeper."""
    return conf_B > threshold_B
