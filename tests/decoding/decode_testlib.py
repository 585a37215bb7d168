"""Shared models, inputs and slow-but-obvious reference decoders for the decoding tests.

Everything expensive (parameters, jitted functions) is cached at module level so every test file
shares one compile per static configuration.

Models. Random tiny T5s (preset "tiny": L = 4 decoder layers, S = 1, V = 128) have flat, disagreeing
exits, so two edits make early exiting happen the way it does in trained models:
* `agreeing`: the deep layers' residual branches are scaled down, so the deep exit mostly agrees
  with the shallow one, and the LM head is scaled up, so confidences spread over (0, 1);
* `with_eos`: EOS's LM-head row copies a frequent token's (times 1.05), so sequences end early, at
  different lengths per example.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding import confidence as conf_lib
from free_jax.models import T5, param_shapes, preset

CONFIG = preset("tiny")
L = CONFIG.num_decoder_layers
S = CONFIG.shallow_layer
N = 8  # max_decode_len
W = 4  # FREE window in the tests: passes of width 1, 2 and 4
EOS = CONFIG.eos_token_id
SEEDS = (0, 1, 2)


def encoder_tokens(seed: int = 0) -> np.ndarray:
    """[3, 7] int32 encoder tokens; rows 1 and 2 are padded."""
    enc = np.random.default_rng(100 + seed).integers(2, CONFIG.vocab_size, size=(3, 7))
    enc[1, 4:] = 0
    enc[2, 2:] = 0
    return enc.astype(np.int32)


def _edit_decoder(params, fn):
    dec = jax.tree_util.tree_map(lambda x: x, params["decoder"])  # a fresh (mutable) copy
    fn(dec)
    return {**params, "decoder": dec}


@functools.lru_cache
def base_params(seed: int):
    """Random parameters drawn with numpy (compiling `init_params` costs seconds per test run):
    norm scales 1, kernels N(0, 1 / fan_in), embeddings and position biases N(0, 1)."""
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            return jnp.ones(shape.shape, jnp.float32)
        std = shape.shape[0] ** -0.5 if "kernel" in name else 1.0
        return jnp.asarray(rng.normal(0.0, std, size=shape.shape), jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(CONFIG))


@functools.lru_cache
def agreeing(seed: int, deep_scale: float = 0.3, head_scale: float = 4.0):
    def edit(dec):
        for i in range(S, L):
            layer = dec[f"layers_{i}"]
            layer["mlp"]["wo"]["kernel"] = layer["mlp"]["wo"]["kernel"] * deep_scale
            for block in ("self_attention", "encoder_decoder_attention"):
                layer[block]["out"]["kernel"] = layer[block]["out"]["kernel"] * deep_scale
        dec["logits_dense"]["kernel"] = dec["logits_dense"]["kernel"] * head_scale

    return _edit_decoder(base_params(seed), edit)


@functools.lru_cache
def with_eos(seed: int):
    """`agreeing(seed)` where EOS's logit beats one of greedy's tokens whenever that one is > 0.

    The token is picked so that greedy's sequences end at different lengths (not all at once).
    """
    params = agreeing(seed)
    enc = encoder_tokens(seed)
    tokens = naive_greedy(params, enc)
    values, counts = np.unique(tokens[:, 2:][tokens[:, 2:] > 1], return_counts=True)
    for candidate in values[np.argsort(-counts, kind="stable")]:

        def edit(dec, candidate=int(candidate)):
            kernel = dec["logits_dense"]["kernel"]
            dec["logits_dense"]["kernel"] = kernel.at[:, EOS].set(kernel[:, candidate] * 1.05)

        edited = _edit_decoder(params, edit)
        out = naive_greedy(edited, enc)
        lengths = [int(np.argmax(row == EOS)) + 1 if (row == EOS).any() else N for row in out]
        if len(set(lengths)) > 1 and min(lengths) >= 2:
            return edited
    raise AssertionError(f"no EOS twin gives varied lengths for seed {seed}")


# ================================================================== teacher-forced references


@functools.lru_cache
def _forward(config):
    exits = tuple(range(1, config.num_decoder_layers))
    return jax.jit(
        lambda p, e, d: T5(config).apply({"params": p}, e, d, exit_layers=exits, return_hidden=True)
    )


def teacher_forced(params, enc_BS, tokens_BN, config=CONFIG):
    """Full forward pass on decoder inputs [start, tokens[:-1]] (position t predicts tokens[t])."""
    tokens_BN = np.asarray(tokens_BN)
    start = np.full((tokens_BN.shape[0], 1), config.decoder_start_token_id, np.int32)
    inputs = np.concatenate([start, tokens_BN[:, :-1]], axis=1).astype(np.int32)
    return _forward(config)(params, jnp.asarray(enc_BS), jnp.asarray(inputs))


def naive_greedy(params, enc_BS, *, exit_layer=None, max_lengths=None, config=CONFIG):
    """Greedy by re-running the teacher-forced model on the prefix every step: [B, N] tokens."""
    b = enc_BS.shape[0]
    max_lengths = np.full(b, N) if max_lengths is None else np.asarray(max_lengths)
    tokens = np.zeros((b, N), np.int32)
    done = max_lengths <= 0
    for t in range(N):
        out = teacher_forced(params, enc_BS, tokens, config)
        logits = out.logits if exit_layer is None else out.exit_logits[exit_layer]
        nxt = np.asarray(jnp.argmax(logits[:, t], axis=-1))
        tokens[:, t] = np.where(done, 0, nxt)
        done = done | (nxt == EOS) | (t + 1 >= max_lengths)
    return tokens


def shallow_confidence(out, t, measure, head_params=None, shallow=S, config=CONFIG):
    """The shallow exit's confidence at position t of a batch-1 teacher-forced output."""
    if measure == "softmax_margin":
        return float(conf_lib.softmax_margin(out.exit_logits[shallow][:, t])[0])
    if measure == "hidden_cosine":
        hidden = out.decoder_hidden
        prev = hidden[shallow - 2][:, t] if shallow >= 2 else None
        return float(conf_lib.hidden_cosine(prev, hidden[shallow - 1][:, t])[0])
    if measure == "learned":
        normed = T5(config).apply(
            {"params": head_params[0]}, out.decoder_hidden[shallow - 1][:, t],
            method=lambda m, h: m.decoder.final(h),
        )  # fmt: skip
        return float(conf_lib.learned_confidence(head_params[1], normed)[0])
    raise ValueError(measure)


def simulate_free(
    params, enc_1S, threshold, *, mode="plain", rollback_threshold=np.inf, window=W,
    measure="softmax_margin", head_params=None, config=CONFIG,
):  # fmt: skip
    """FREE on one example, written as plainly as possible on top of teacher-forced passes.

    Follows the reference `deploying_t5.py` at batch 1: a token is the shallow argmax when the
    shallow confidence exceeds the threshold, else the deep argmax; the deep layers verify the
    stacked positions when a token goes deep (or when the window is full, or, in the verifying
    modes, before a shallow EOS or the last position becomes final). Rollback replaces the first
    stacked token whose deep cross-entropy exceeds `rollback_threshold`; lossless the first that
    differs from the deep argmax.
    Returns (tokens [N], exit layers [N], confidences [N], {position: (confidence, agree)}).
    """
    shallow, deep = config.shallow_layer, config.num_decoder_layers
    verify = mode != "plain"
    tokens, exits, confs, records = [], [], [], {}
    start = 0  # first position not yet seen by the deep layers
    while len(tokens) < N and not (tokens and tokens[-1] == EOS):
        t = len(tokens)
        padded = np.zeros((1, N), np.int32)
        padded[0, :t] = tokens
        out = teacher_forced(params, enc_1S, padded, config)
        shallow_logits = np.asarray(out.exit_logits[shallow][0])
        deep_logits = np.asarray(out.logits[0])
        conf = shallow_confidence(out, t, measure, head_params, shallow, config)
        proposal = int(np.argmax(shallow_logits[t]))
        leaves = conf > threshold
        forced = t - start + 1 >= window or (verify and (proposal == EOS or t + 1 >= N))
        if leaves and not forced:
            tokens.append(proposal), exits.append(shallow), confs.append(conf)
            continue
        rows = list(range(start, t + 1))
        proposed = tokens[start:t] + [proposal]
        row_conf = confs[start:t] + [conf]
        for q, c in zip(rows, row_conf):
            records[q] = (c, int(np.argmax(deep_logits[q])) == int(np.argmax(shallow_logits[q])))
        rejected = None
        for q, tok in zip(rows, proposed):
            if q == t and not leaves:
                break
            log_probs = jax.nn.log_softmax(deep_logits[q])
            if mode == "lossless" and tok != int(np.argmax(deep_logits[q])):
                rejected = q
            if mode == "rollback" and -float(log_probs[tok]) > rollback_threshold:
                rejected = q
            if rejected is not None:
                break
        if rejected is not None:
            for q in range(rejected + 1, t + 1):
                records.pop(q, None)
            del tokens[rejected:], exits[rejected:]
            keep_conf = confs[rejected]
            del confs[rejected:]
            tokens.append(int(np.argmax(deep_logits[rejected])))
            exits.append(deep), confs.append(keep_conf if rejected < t else conf)
        elif leaves:
            tokens.append(proposal), exits.append(shallow), confs.append(conf)
        else:
            tokens.append(int(np.argmax(deep_logits[t]))), exits.append(deep), confs.append(conf)
        start = len(tokens)
    pad = lambda xs, dtype: np.array(list(xs) + [0] * (N - len(xs)), dtype)
    return pad(tokens, np.int32), pad(exits, np.int32), pad(confs, np.float32), records


def replicate(enc_BS, row: int) -> np.ndarray:
    """Example `row` alone: the same example in every row, so the batch behaves as batch 1."""
    return np.repeat(enc_BS[row : row + 1], enc_BS.shape[0], axis=0)


def threshold_between(confidences, quantile=0.5) -> float:
    """A threshold near `quantile` of the observed confidences, halfway between two of them.

    A threshold equal to an observed confidence would make comparisons with the teacher-forced
    references depend on rounding (the exit test is strict).
    """
    conf = np.unique(np.asarray(confidences, np.float64))
    i = min(max(int(round(quantile * (len(conf) - 1))), 0), len(conf) - 2)
    return float((conf[i] + conf[i + 1]) / 2)
