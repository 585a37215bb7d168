"""Second-stage training of the learned confidence head (`decoding.confidence.ConfidenceHead`).

With the T5 frozen, the head learns to predict, from an exit's normalised hidden state, whether that
exit's argmax equals the deep exit's. The loss is cross-entropy with logit adjustment (Menon et
al. 2021): log class priors are added to the logits, so the rare class is not ignored; the FREE
reference trains its "meta" head the same way.

    data = confidence_head_data(config, params, enc_BS, dec_BT, mask_BT, exit_layer=S)
    head = train_confidence_head(data, d_model=config.d_model, steps=200)
    decode(..., measure="learned", confidence_params=head)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import struct

from free_jax.decoding.confidence import ConfidenceHead, init_confidence_head
from free_jax.models import T5, T5Config


@struct.dataclass
class HeadData:
    """Training pairs for the head.

    Attributes:
      normed_MD: [M, D] exit hidden states after the shared final norm.
      agree_M: [M] bool, the exit's argmax equals the deep argmax.
      weight_M: [M] float32, 1 on real positions, 0 on padding.
    """

    normed_MD: jax.Array
    agree_M: jax.Array
    weight_M: jax.Array


@functools.partial(jax.jit, static_argnames=("config", "exit_layer"))
def confidence_head_data(
    config: T5Config, params, encoder_tokens_BS, decoder_inputs_BT, mask_BT, *, exit_layer: int
) -> HeadData:
    """Teacher-forced (normalised hidden, agree) pairs at `exit_layer` for a batch."""
    model = T5(config)
    out = model.apply(
        {"params": params}, encoder_tokens_BS, decoder_inputs_BT, exit_layers=(exit_layer,),
        return_hidden=True,
    )  # fmt: skip
    normed_BTD = model.apply(
        {"params": params}, out.decoder_hidden[exit_layer - 1],
        method=lambda m, h: m.decoder.final(h),
    )  # fmt: skip
    agree_BT = jnp.argmax(out.exit_logits[exit_layer], -1) == jnp.argmax(out.logits, -1)
    d = normed_BTD.shape[-1]
    return HeadData(
        normed_MD=jax.lax.stop_gradient(normed_BTD.reshape(-1, d)).astype(jnp.float32),
        agree_M=agree_BT.reshape(-1),
        weight_M=mask_BT.reshape(-1).astype(jnp.float32),
    )


def confidence_head_loss(head_params, data: HeadData) -> jax.Array:
    """Logit-adjusted cross-entropy of the (disagree, agree) classifier, averaged over weights."""
    hidden_dim = head_params["hidden"]["kernel"].shape[1]
    logits_M2 = ConfidenceHead(hidden_dim).apply({"params": head_params}, data.normed_MD)
    total = jnp.maximum(jnp.sum(data.weight_M), 1.0)
    positive = jnp.sum(data.weight_M * data.agree_M) / total
    prior_2 = jnp.log(jnp.clip(jnp.stack([1.0 - positive, positive]), 1e-6, 1.0))
    labels_M = data.agree_M.astype(jnp.int32)
    ce_M = optax.softmax_cross_entropy_with_integer_labels(logits_M2 + prior_2, labels_M)
    return jnp.sum(ce_M * data.weight_M) / total


def train_confidence_head(
    data: HeadData,
    *,
    d_model: int,
    steps: int = 200,
    learning_rate: float = 1e-3,
    rng: jax.Array | None = None,
):
    """Full-batch Adam on `confidence_head_loss` (one compiled scan); returns the head parameters."""
    head = init_confidence_head(d_model, jax.random.key(0) if rng is None else rng)
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        head, opt_state = carry
        loss, grads = jax.value_and_grad(confidence_head_loss)(head, data)
        updates, opt_state = optimizer.update(grads, opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), loss

    @jax.jit
    def run(head):
        (head, _), _ = jax.lax.scan(step, (head, optimizer.init(head)), None, length=steps)
        return head

    return run(head)
