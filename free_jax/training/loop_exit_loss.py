"""Early-exit post-training of a recursive model: exits at its loop boundaries (loss kind
"loop_exits").

A recursive model (`models.recursive.RecursiveConfig`, B loops over shared blocks) exits naturally
where a loop ends: the layers `config.loop_exit_layers` (loops 0..B-2). Every exit reads the shared
final norm and LM head. With CE the token cross-entropy against the labels and alpha
`LossConfig.loop_exit_alpha`:

    total = CE_L + alpha * sum over exits i of (CE_i + KD_i)

KD_i distils the final layer into exit i with soft targets: the cross-entropy of exit i's
distribution q_i against the final softmax p_L, whose gradient is stopped (the exits learn from
the final layer, never the other way round). It is reported as KL(p_L || q_i), which is that
cross-entropy minus the entropy of p_L: a constant under the stopped gradient, so the gradients are
the same, and KD_i is 0 exactly when exit i already matches the final layer.

Token terms are means weighted by `decoder_loss_weights`, as in every loss of `training.losses`.

    exit_layers = loop_exit_layers(config)     # (2, 4) for L = 6 layers in B = 3 loops
    out = forward(config, params, batch, exit_layers=exit_layers)
    loss, metrics = loop_exits_loss(out.logits, out.exit_logits, targets_BT, weights_BT, alpha=0.1)
    metrics["ce_loop0"], metrics["kd_loop1"], metrics["ce_deep"]
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from free_jax.models.recursive import RecursiveConfig
from free_jax.training.losses import accuracy, cross_entropy, token_kl, weighted_mean


def loop_exit_layers(model_config) -> tuple[int, ...]:
    """The exits of kind "loop_exits": `config.loop_exit_layers`, after checking the model has
    loops to exit from."""
    if not isinstance(model_config, RecursiveConfig):
        raise ValueError(
            "LossConfig.kind='loop_exits' trains exits at the loop boundaries of a recursive "
            f"model (RecursiveConfig), got a {type(model_config).__name__}; convert a trained "
            "model with `python -m free_jax.recursify` and start from its output"
        )
    if model_config.num_loops < 2:
        raise ValueError(
            "LossConfig.kind='loop_exits' needs loop boundaries, but RecursiveConfig.num_loops="
            f"{model_config.num_loops}: the model runs its blocks once (no exit before the last "
            "layer)"
        )
    return model_config.loop_exit_layers


def loop_exits_loss(
    final_logits_BTV: jax.Array,
    exit_logits: Mapping[int, jax.Array],
    targets_BT: jax.Array,
    weights_BT: jax.Array,
    *,
    alpha: float = 0.1,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CE_L + alpha * sum_i (CE_i + KD_i) (+ z-loss); see the module docstring.

    Args:
      final_logits_BTV: [B, T, V] logits of the last layer L.
      exit_logits: {layer: [B, T, V]} logits of the loop-boundary exits (1-based layers, < L);
        exit j (0-based, shallowest first) ends loop j.
      targets_BT, weights_BT: labels and their loss weights [B, T].
      alpha: weight of the exits' terms.
      z_loss: t5x's z-loss coefficient, applied to every CE term with that term's weight.
    Returns:
      (total, metrics): "loss", "ce_deep", "acc_deep", "z_loss", "kd" (sum of KD_i) and per exit
      j "ce_loop{j}", "acc_loop{j}", "kd_loop{j}".
    """
    ce_deep, z_term = cross_entropy(final_logits_BTV, targets_BT, weights_BT, z_loss)
    metrics = {"ce_deep": ce_deep, "acc_deep": accuracy(final_logits_BTV, targets_BT, weights_BT)}
    exits_total, kd_total = jnp.zeros(()), jnp.zeros(())
    for j, layer in enumerate(sorted(exit_logits)):
        logits_BTV = exit_logits[layer]
        ce, z = cross_entropy(logits_BTV, targets_BT, weights_BT, z_loss)
        # token_kl stops the final layer's gradient: it teaches, it does not learn here.
        kd = weighted_mean(token_kl(final_logits_BTV, logits_BTV), weights_BT)
        exits_total = exits_total + ce + kd
        kd_total = kd_total + kd
        z_term = z_term + alpha * z
        metrics[f"ce_loop{j}"] = ce
        metrics[f"acc_loop{j}"] = accuracy(logits_BTV, targets_BT, weights_BT)
        metrics[f"kd_loop{j}"] = kd
    total = ce_deep + alpha * exits_total + z_term
    metrics.update(loss=total, kd=kd_total, z_loss=z_term)
    return total, metrics
