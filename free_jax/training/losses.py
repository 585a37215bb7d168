"""Training losses: plain cross-entropy, CALM's depth-weighted CE, FREE's shallow-deep loss, the
self-distillation of exit heads (Valade 2024), and exits at a recursive model's loop boundaries
(kind "loop_exits", in `training.loop_exit_loss`).

All of them read the same batch (t5x feature names) and work on any model family: the model is run
in one place (`forward.forward`: T5 on encoder + decoder tokens, a decoder-only LM on its decoder
tokens), and every exit goes through the shared final norm and LM head. Token losses are means
weighted by `decoder_loss_weights`, so padding (and, for a decoder-only prompt, the prompt tokens)
never counts.

FREE (Bae et al. 2023, eq. 2-3), with S the shallow exit layer and L the decoder depth:

    total = (S * CE_S + L * CE_L) / (S + L) + alpha * KD

KD distils the deep decoder into the shallow one, layer by layer: the normalised outputs of the
student layers 1..S are pulled towards (stop-gradient) normalised outputs of S teacher layers, with
FREE's dynamic alignment deciding which student each teacher teaches (see `dynamic_alignment`).

Exit heads (kind "exit_heads"): the backbone is frozen and only the heads tree
(`models.exit_heads`) trains. Each head on layer l is pulled towards the model's own final
distribution from the same pass (gradients stopped), with the loss-weighted mean over positions and
the mean over heads:

    total = mean_l  weighted_mean_t  tau^2 * KL( softmax(z_L / tau) || softmax(z_l / tau) )

With `exit_heads_top_k = k` the teacher keeps only its k most likely tokens, renormalised; the
head's distribution stays over the whole vocabulary (so the loss also pushes mass onto those k).
No labels are read: any text trains the heads.

Example (values from a hand computation in tests/training/test_losses.py):
    loss, metrics = compute_loss(model_config, LossConfig(kind="free"), params, batch,
                                 rng=key, deterministic=False)
    metrics["ce_shallow"], metrics["ce_deep"], metrics["kd"], metrics["acc_shallow"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

from free_jax.models.exit_heads import exit_head_layers, head_logits
from free_jax.models.field_types import check_field_types
from free_jax.training.forward import ModelConfig, forward, intermediate_exits

LOSS_KINDS = ("free", "calm", "ce", "exit_heads", "loop_exits")
ALIGNMENTS = ("dynamic", "uniform", "last")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Which loss to train with.

    Attributes:
      kind: "free" (shallow-deep CE + layer-wise KD), "calm" (every layer's CE, weighted by
        depth), "ce" (top layer only: the full-model baseline) or "exit_heads" (self-distillation
        of exit heads into a frozen backbone; `TrainConfig.exit_heads` says which layers) or
        "loop_exits" (a recursive model's exits at its loop boundaries, distilled from the final
        layer: CE_L + loop_exit_alpha * sum_i (CE_i + KD_i); see `training.loop_exit_loss`).
      kd_alpha: FREE's alpha, the weight of the distillation term.
      kd_alignment: how teachers pick students: "dynamic" (FREE's default), "uniform" (teacher j
        teaches student j) or "last" (the deep output teaches the shallow exit only).
      z_loss: coefficient of t5x's auxiliary z-loss, log(Z)^2 per target token (0 disables it).
      exit_heads_temperature: tau of the exit heads' KL; both distributions are softened by it and
        the KL is scaled by tau^2 (Hinton's convention, which keeps gradient sizes comparable).
      exit_heads_top_k: restrict the exit heads' teacher to its top-k tokens, renormalised (None:
        the whole vocabulary).
      loop_exit_alpha: the weight of the loop exits' CE and KD terms (kind "loop_exits").
    """

    kind: str = "free"
    kd_alpha: float = 0.5
    kd_alignment: str = "dynamic"
    z_loss: float = 0.0
    exit_heads_temperature: float = 1.0
    exit_heads_top_k: int | None = None
    loop_exit_alpha: float = 0.1

    def __post_init__(self):
        check_field_types(self)
        if self.kind not in LOSS_KINDS:
            raise ValueError(f"LossConfig.kind={self.kind!r}; expected one of {LOSS_KINDS}")
        if self.kd_alignment not in ALIGNMENTS:
            raise ValueError(
                f"LossConfig.kd_alignment={self.kd_alignment!r}; expected one of {ALIGNMENTS}"
            )
        if self.kd_alpha < 0 or self.z_loss < 0:
            raise ValueError("LossConfig.kd_alpha and z_loss must be >= 0")
        if not self.exit_heads_temperature > 0:
            raise ValueError(
                f"LossConfig.exit_heads_temperature={self.exit_heads_temperature} must be > 0"
            )
        if self.exit_heads_top_k is not None and self.exit_heads_top_k < 1:
            raise ValueError(f"LossConfig.exit_heads_top_k={self.exit_heads_top_k} must be >= 1")
        if not self.loop_exit_alpha >= 0:
            raise ValueError(f"LossConfig.loop_exit_alpha={self.loop_exit_alpha} must be >= 0")


# ---------------------------------------------------------------------------------------------
# Token-level pieces
# ---------------------------------------------------------------------------------------------


def weighted_mean(x_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """sum(x * w) / sum(w); 0 when every weight is 0 (an all-padding batch)."""
    weights_BT = weights_BT.astype(jnp.float32)
    return jnp.sum(x_BT * weights_BT) / jnp.maximum(jnp.sum(weights_BT), 1e-8)


def token_cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy and log-partition, both [B, T] float32.

    >>> ce, log_z = token_cross_entropy(jnp.zeros((1, 1, 4)), jnp.array([[2]]))
    >>> float(ce[0, 0]), float(log_z[0, 0])   # log(4) both: uniform over 4 tokens
    (1.386..., 1.386...)
    """
    logits_BTV = logits_BTV.astype(jnp.float32)
    log_z_BT = jax.nn.logsumexp(logits_BTV, axis=-1)
    target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return log_z_BT - target_logit_BT, log_z_BT


def cross_entropy(
    logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, jax.Array]:
    """(weighted mean CE, weighted mean z-loss term) of one exit."""
    ce_BT, log_z_BT = token_cross_entropy(logits_BTV, targets_BT)
    z_term = z_loss * weighted_mean(jnp.square(log_z_BT), weights_BT) if z_loss else jnp.zeros(())
    return weighted_mean(ce_BT, weights_BT), z_term


def accuracy(logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Share of (weighted) target tokens whose argmax prediction is right."""
    return weighted_mean((jnp.argmax(logits_BTV, -1) == targets_BT).astype(jnp.float32), weights_BT)


def hidden_mse(a_BTD: jax.Array, b_BTD: jax.Array, weights_BT: jax.Array) -> jax.Array:
    """Mean over D of the squared difference, then the weighted mean over tokens."""
    diff = a_BTD.astype(jnp.float32) - b_BTD.astype(jnp.float32)
    return weighted_mean(jnp.mean(jnp.square(diff), axis=-1), weights_BT)


# ---------------------------------------------------------------------------------------------
# FREE's layer-wise distillation
# ---------------------------------------------------------------------------------------------

# The reference implementation tabulates teachers (1-based decoder layers) for a few (L, S).
# Its irregular L=24, S=10 row is kept verbatim; every other row equals the formula below.
_REFERENCE_TEACHERS = {
    (24, 12): tuple(range(2, 25, 2)),
    (24, 10): (3, 6, 8, 11, 13, 16, 18, 20, 22, 24),
    (24, 8): tuple(range(3, 25, 3)),
    (24, 6): tuple(range(4, 25, 4)),
    (24, 4): (6, 12, 18, 24),
    (12, 3): (4, 8, 12),
}


def teacher_layers(num_layers: int, shallow_layer: int) -> tuple[int, ...]:
    """The S deep decoder layers (1-based) whose outputs teach the shallow layers 1..S.

    FREE spaces S teachers evenly over the L layers, ending at the top: teacher j (j = 1..S) is
    layer ceil(j * L / S). For the (L, S) pairs the reference tabulates this is the table (L=24,
    S=10, whose hand-picked row is used verbatim). Because L / S > 1, teacher j is strictly deeper
    than student j and the teachers are distinct and increasing, for any 1 <= S < L.

    >>> teacher_layers(8, 2), teacher_layers(12, 3), teacher_layers(4, 1), teacher_layers(6, 4)
    ((4, 8), (4, 8, 12), (4,), (2, 3, 5, 6))
    """
    if not 1 <= shallow_layer < num_layers:
        raise ValueError(f"need 1 <= S < L, got S={shallow_layer}, L={num_layers}")
    if (num_layers, shallow_layer) in _REFERENCE_TEACHERS:
        return _REFERENCE_TEACHERS[(num_layers, shallow_layer)]
    # Integer ceil avoids float rounding at exact multiples.
    return tuple(-(-j * num_layers // shallow_layer) for j in range(1, shallow_layer + 1))


def dynamic_alignment(mse_TS: jax.Array) -> jax.Array:
    """FREE's dynamic layer alignment: which student each teacher distils into.

    Teachers are visited from the deepest down. Each takes the student with the lowest error among
    those strictly below the previous teacher's pick (the deepest teacher may take any student).
    When no student is left below (the previous pick was student 0), it repeats the previous pick.
    The result is therefore non-increasing from the last teacher backwards. Ties go to the
    shallower student.

    Args:
      mse_TS: [T, S] error of teacher t against student s (both 0-based).
    Returns:
      [T] int32 student index per teacher.

    Worked example (3 teachers, 3 students):
        mse = [[1, 5, 6],   # teacher 0: no student below 0 is left -> repeats student 0
               [4, 2, 3],   # teacher 1: only students < 1 -> student 0
               [9, 1, 2]]   # teacher 2, visited first: any student -> student 1 (error 1)
        dynamic_alignment(mse) == [0, 0, 1]
    """
    num_teachers, num_students = mse_TS.shape
    student_S = jnp.arange(num_students)
    picks = [None] * num_teachers
    bound = jnp.asarray(num_students, jnp.int32)  # students must sit strictly below this
    for t in range(num_teachers - 1, -1, -1):
        allowed_S = student_S < bound
        best = jnp.argmin(jnp.where(allowed_S, mse_TS[t], jnp.inf)).astype(jnp.int32)
        pick = jnp.where(jnp.any(allowed_S), best, bound)
        picks[t] = pick
        bound = pick
    return jnp.stack(picks)


def distillation_loss(
    students: Sequence[jax.Array],
    teachers: Sequence[jax.Array],
    weights_BT: jax.Array,
    alignment: str = "dynamic",
) -> tuple[jax.Array, jax.Array]:
    """FREE's KD term: the mean over teachers of the error against their aligned student.

    Args:
      students: S normalised student states [B, T, D] (decoder layers 1..S, after the final norm).
      teachers: normalised teacher states [B, T, D]; gradients are stopped here.
      weights_BT: target-token weights (padding excluded from every error).
      alignment: "dynamic", "uniform" (teacher j -> student j; needs as many teachers as students)
        or "last" (only the last teacher and the last student).
    Returns:
      (kd scalar, [T] int32 student index per teacher).
    """
    teachers = [jax.lax.stop_gradient(t) for t in teachers]
    if alignment == "last":
        return hidden_mse(students[-1], teachers[-1], weights_BT), jnp.array([len(students) - 1])
    if alignment == "uniform":
        if len(students) != len(teachers):
            raise ValueError("uniform alignment needs as many teachers as students")
        errors = jnp.stack([hidden_mse(s, t, weights_BT) for s, t in zip(students, teachers)])
        return jnp.mean(errors), jnp.arange(len(students), dtype=jnp.int32)
    mse_TS = jnp.stack(
        [jnp.stack([hidden_mse(s, t, weights_BT) for s in students]) for t in teachers]
    )
    # The choice itself is not differentiated; the chosen errors are.
    picks_T = dynamic_alignment(jax.lax.stop_gradient(mse_TS))
    chosen_T = mse_TS[jnp.arange(len(teachers)), picks_T]
    return jnp.mean(chosen_T), picks_T


# ---------------------------------------------------------------------------------------------
# The three losses on logits and hidden states
# ---------------------------------------------------------------------------------------------


def free_loss(
    shallow_logits_BTV: jax.Array,
    deep_logits_BTV: jax.Array,
    students: Sequence[jax.Array],
    teachers: Sequence[jax.Array],
    targets_BT: jax.Array,
    weights_BT: jax.Array,
    *,
    shallow_layer: int,
    num_layers: int,
    alpha: float = 0.5,
    alignment: str = "dynamic",
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(S * CE_S + L * CE_L) / (S + L) + alpha * KD (+ z-loss); see the module docstring."""
    s, d = shallow_layer, num_layers  # the shallow and deep exits' layers weight their CE
    ce_s, z_s = cross_entropy(shallow_logits_BTV, targets_BT, weights_BT, z_loss)
    ce_d, z_d = cross_entropy(deep_logits_BTV, targets_BT, weights_BT, z_loss)
    kd, picks_T = distillation_loss(students, teachers, weights_BT, alignment)
    z_term = (s * z_s + d * z_d) / (s + d)
    total = (s * ce_s + d * ce_d) / (s + d) + alpha * kd + z_term
    metrics = {
        "loss": total,
        "ce_shallow": ce_s,
        "ce_deep": ce_d,
        "kd": kd,
        "z_loss": z_term,
        "acc_shallow": accuracy(shallow_logits_BTV, targets_BT, weights_BT),
        "acc_deep": accuracy(deep_logits_BTV, targets_BT, weights_BT),
    }
    for t, pick in enumerate(picks_T):
        metrics[f"kd_align_{t}"] = pick.astype(jnp.float32)
    return total, metrics


def calm_loss(
    logits_by_layer: Mapping[int, jax.Array],
    targets_BT: jax.Array,
    weights_BT: jax.Array,
    *,
    shallow_layer: int | None = None,
    z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """CALM: sum_l l * CE_l / sum_l l over every decoder layer l = 1..L.

    `logits_by_layer` maps each 1-based layer to its exit logits. `shallow_layer`, when given, adds
    that exit's numbers under the FREE metric names for comparison.
    """
    total, norm, metrics = 0.0, 0.0, {}
    for layer in sorted(logits_by_layer):
        ce, z = cross_entropy(logits_by_layer[layer], targets_BT, weights_BT, z_loss)
        total, norm = total + layer * (ce + z), norm + layer
        metrics[f"ce_layer{layer}"] = ce
    deep = max(logits_by_layer)
    total = total / norm
    metrics["loss"] = total
    metrics["ce_deep"] = metrics[f"ce_layer{deep}"]
    metrics["acc_deep"] = accuracy(logits_by_layer[deep], targets_BT, weights_BT)
    if shallow_layer is not None:
        metrics["ce_shallow"] = metrics[f"ce_layer{shallow_layer}"]
        metrics["acc_shallow"] = accuracy(logits_by_layer[shallow_layer], targets_BT, weights_BT)
    return total, metrics


def ce_loss(
    deep_logits_BTV: jax.Array, targets_BT: jax.Array, weights_BT: jax.Array, z_loss: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The full-model baseline: CE of the top layer only."""
    ce, z = cross_entropy(deep_logits_BTV, targets_BT, weights_BT, z_loss)
    metrics = {
        "loss": ce + z,
        "ce_deep": ce,
        "z_loss": z,
        "acc_deep": accuracy(deep_logits_BTV, targets_BT, weights_BT),
    }
    return ce + z, metrics


# ---------------------------------------------------------------------------------------------
# Exit heads: self-distillation of the final distribution
# ---------------------------------------------------------------------------------------------


def token_kl(
    teacher_logits_BTV: jax.Array,
    student_logits_BTV: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> jax.Array:
    """[B, T] float32 tau^2 * KL(teacher || student) of softmax(logits / tau), per position.

    The teacher's gradient is stopped. With `top_k` the teacher is its k largest probabilities,
    renormalised; the student's log-probabilities stay normalised over the whole vocabulary.

    >>> float(token_kl(jnp.log(jnp.array([[[0.5, 0.5]]])), jnp.log(jnp.array([[[0.25, 0.75]]])))[0, 0])
    0.143...
    """
    teacher = jax.lax.stop_gradient(teacher_logits_BTV.astype(jnp.float32)) / temperature
    log_q_BTV = jax.nn.log_softmax(student_logits_BTV.astype(jnp.float32) / temperature, axis=-1)
    if top_k is None:
        log_p_BTV = jax.nn.log_softmax(teacher, axis=-1)
        kl_BT = jnp.sum(jnp.exp(log_p_BTV) * (log_p_BTV - log_q_BTV), axis=-1)
    else:
        top_BTK, index_BTK = jax.lax.top_k(teacher, min(top_k, teacher.shape[-1]))
        log_p_BTK = jax.nn.log_softmax(top_BTK, axis=-1)
        log_q_BTK = jnp.take_along_axis(log_q_BTV, index_BTK, axis=-1)
        kl_BT = jnp.sum(jnp.exp(log_p_BTK) * (log_p_BTK - log_q_BTK), axis=-1)
    return temperature**2 * kl_BT


def exit_heads_loss(
    final_logits_BTV: jax.Array,
    head_logits: Mapping[int, jax.Array],
    weights_BT: jax.Array,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over heads of the weighted mean KL(final || head); see the module docstring.

    Metrics: "loss", per head layer l `kl_head{l}` (the KL at `temperature`, with `top_k`) and
    `agree_head{l}` (share of positions whose head argmax is the final argmax).
    """
    metrics = {}
    final_BT = jnp.argmax(final_logits_BTV, axis=-1)
    kls = []
    for layer in sorted(head_logits):
        logits_BTV = head_logits[layer]
        kl = weighted_mean(
            token_kl(final_logits_BTV, logits_BTV, temperature=temperature, top_k=top_k),
            weights_BT,
        )
        kls.append(kl)
        metrics[f"kl_head{layer}"] = kl
        agree_BT = (jnp.argmax(logits_BTV, axis=-1) == final_BT).astype(jnp.float32)
        metrics[f"agree_head{layer}"] = weighted_mean(agree_BT, weights_BT)
    total = jnp.mean(jnp.stack(kls))
    metrics["loss"] = total
    return total, metrics


def _exit_heads_forward(model_config: ModelConfig, params, heads, batch):
    """(final logits, {layer: head logits}) with the backbone in inference mode."""
    layers = exit_head_layers(heads)
    # The backbone is frozen: it runs deterministically (dropout would only add noise to the
    # teacher and to the features the heads read), and no gradient flows into it.
    out = forward(model_config, params, batch, hidden_layers=layers, deterministic=True)
    logits = {
        layer: head_logits(model_config, heads, layer, jax.lax.stop_gradient(out.hidden[layer]))
        for layer in layers
    }
    return jax.lax.stop_gradient(out.logits), logits


def exit_head_sums(
    model_config: ModelConfig, loss_config: LossConfig, params, heads, batch
) -> dict[str, jax.Array]:
    """Validation of exit heads: weighted sums of `kl_head{l}` and `agree_head{l}` and the weight
    total (`weight`), so that callers add batches up exactly before dividing."""
    final_BTV, logits = _exit_heads_forward(model_config, params, heads, batch)
    _, weights_BT = _targets_and_weights(model_config, batch)
    weights_BT = weights_BT.astype(jnp.float32)
    final_BT = jnp.argmax(final_BTV, axis=-1)
    sums = {"weight": jnp.sum(weights_BT)}
    for layer, logits_BTV in logits.items():
        kl_BT = token_kl(
            final_BTV, logits_BTV, temperature=loss_config.exit_heads_temperature,
            top_k=loss_config.exit_heads_top_k,
        )  # fmt: skip
        agree_BT = (jnp.argmax(logits_BTV, axis=-1) == final_BT).astype(jnp.float32)
        sums[f"kl_head{layer}"] = jnp.sum(kl_BT * weights_BT)
        sums[f"agree_head{layer}"] = jnp.sum(agree_BT * weights_BT)
    return sums


# ---------------------------------------------------------------------------------------------
# Model + loss
# ---------------------------------------------------------------------------------------------


def _targets_and_weights(config: ModelConfig, batch: Mapping[str, jax.Array]):
    targets_BT = batch["decoder_target_tokens"]
    weights_BT = batch.get("decoder_loss_weights")
    if weights_BT is None:
        weights_BT = targets_BT != config.pad_token_id
    return targets_BT, weights_BT


def compute_loss(
    model_config: ModelConfig,
    loss_config: LossConfig,
    params,
    batch: Mapping[str, jax.Array],
    *,
    rng: jax.Array | None = None,
    deterministic: bool = True,
    exit_heads=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Runs the model teacher-forced on a batch and returns (loss, metrics); any model family.

    Args:
      batch: `decoder_input_tokens` [B, T], `decoder_target_tokens` [B, T],
        `decoder_loss_weights` [B, T] (optional; defaults to target != pad, which drops an EOS
        that doubles as pad: decoder-only batches always carry weights), segment ids / positions
        when packed, and for T5 `encoder_input_tokens` [B, S] (see `forward.forward`).
      rng: dropout key; required when `deterministic` is false and the model has dropout.
      exit_heads: the heads tree (`models.exit_heads`) that kind "exit_heads" trains; `params`
        are then the frozen backbone, run deterministically whatever `deterministic` says.
    """
    c, num_layers, shallow = model_config, model_config.num_decoder_layers, None
    targets_BT, weights_BT = _targets_and_weights(c, batch)
    if loss_config.kind == "exit_heads":
        if exit_heads is None:
            raise ValueError(
                "LossConfig.kind='exit_heads' needs the heads (compute_loss exit_heads=)"
            )
        final_BTV, logits = _exit_heads_forward(c, params, exit_heads, batch)
        return exit_heads_loss(
            final_BTV, logits, weights_BT, temperature=loss_config.exit_heads_temperature,
            top_k=loss_config.exit_heads_top_k,
        )  # fmt: skip
    # loop_exit_loss builds on this module's token pieces: a top-level import would be circular.
    from free_jax.training import loop_exit_loss

    normed_layers = ()
    if loss_config.kind == "free":
        shallow = c.shallow_layer
        teachers = teacher_layers(num_layers, shallow)
        exit_layers = (shallow,)
        # Students and teachers are compared after the shared final norm, as in the reference,
        # so that KD acts on what the LM head reads.
        normed_layers = tuple(sorted(set(range(1, shallow + 1)) | set(teachers)))
    elif loss_config.kind == "calm":
        exit_layers = tuple(range(1, num_layers))
    elif loss_config.kind == "loop_exits":
        exit_layers = loop_exit_loss.loop_exit_layers(c)
    else:
        exit_layers = ()
    out = forward(
        c, params, batch, exit_layers=exit_layers, normed_layers=normed_layers, rng=rng,
        deterministic=deterministic,
    )  # fmt: skip
    if out.aux:  # the model's own losses (Mixture-of-Recursions' routers), only with kind "ce"
        loss, metrics = ce_loss(out.logits, targets_BT, weights_BT, loss_config.z_loss)
        metrics.update({f"aux_{k}": v for k, v in out.aux.items()})
        metrics["loss"] = loss + out.aux["total"]
        return metrics["loss"], metrics
    if loss_config.kind == "free":
        return free_loss(
            out.exit_logits[shallow], out.logits,
            [out.normed[i] for i in range(1, shallow + 1)], [out.normed[i] for i in teachers],
            targets_BT, weights_BT, shallow_layer=shallow, num_layers=num_layers,
            alpha=loss_config.kd_alpha, alignment=loss_config.kd_alignment,
            z_loss=loss_config.z_loss,
        )  # fmt: skip
    if loss_config.kind == "calm":
        logits = {**out.exit_logits, num_layers: out.logits}
        return calm_loss(
            logits, targets_BT, weights_BT, shallow_layer=c.shallow_layer, z_loss=loss_config.z_loss
        )
    if loss_config.kind == "loop_exits":
        return loop_exit_loss.loop_exits_loss(
            out.logits, out.exit_logits, targets_BT, weights_BT,
            alpha=loss_config.loop_exit_alpha, z_loss=loss_config.z_loss,
        )  # fmt: skip
    return ce_loss(out.logits, targets_BT, weights_BT, loss_config.z_loss)


def exit_losses(
    model_config: ModelConfig, params, batch: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Deterministic CE and accuracy of every exit 1..L (validation): `ce_layer{l}`, `acc_layer{l}`.

    Returns weighted sums and the weight total (`weight`) so that callers can add batches up
    exactly before dividing.
    """
    num_layers = model_config.num_decoder_layers
    out = forward(model_config, params, batch, exit_layers=intermediate_exits(model_config))
    targets_BT, weights_BT = _targets_and_weights(model_config, batch)
    weights_BT = weights_BT.astype(jnp.float32)
    sums = {"weight": jnp.sum(weights_BT)}
    for layer, logits in {**out.exit_logits, num_layers: out.logits}.items():
        ce_BT, _ = token_cross_entropy(logits, targets_BT)
        right_BT = (jnp.argmax(logits, -1) == targets_BT).astype(jnp.float32)
        sums[f"ce_layer{layer}"] = jnp.sum(ce_BT * weights_BT)
        sums[f"acc_layer{layer}"] = jnp.sum(right_BT * weights_BT)
    return sums
