"""What a decoding step's pieces cost on this machine, and the speedup bounds they imply.

Used by `free_jax.benchmarks.decode`, whose module doc explains its `bound`, `bound+heads` and
`pieces` columns: decoder layers only; exit heads counted too; and (FREE) every piece timed here,
each deep pass charged at the width it ran at.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding import free_bound, pass_widths
from free_jax.decoding.deferral import StepCosts
from free_jax.decoding.specs import CalmSpec, FreeSpec, Spec, StaticSpec
from free_jax.models import bind


def timed_runs(fn, repeats: int):
    """(first call seconds, median of `repeats` later calls, last result)."""
    t0 = time.perf_counter()
    result = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), result


def _many(spec: Spec) -> bool:
    """A CALM or FREE spec with more than one listed exit."""
    return getattr(spec, "exits", None) is not None and len(spec.exits) > 1


def _free_shallow(spec: FreeSpec, shallow: int) -> int:
    """FREE's S: the spec's, else the config's (`shallow`)."""
    return shallow if spec.shallow is None else spec.shallow


def layer_bound(spec: Spec, result, num_layers: int, shallow: int) -> float:
    """The decoder-compute bound of a run of `spec`: decoder layers only (see the benchmark doc).

    `shallow` is the config's S (FREE's when its spec leaves `shallow` unset).
    """
    if isinstance(spec, FreeSpec) and not _many(spec):
        return free_bound(num_layers, _free_shallow(spec, shallow), result.exit_rate(num_layers))
    if isinstance(spec, StaticSpec):
        return num_layers / spec.exit_layer
    if isinstance(spec, CalmSpec | FreeSpec):  # a token waits for the layer it leaves at
        exit_layer_BN = np.asarray(result.exit_layer)
        return num_layers / float(exit_layer_BN[exit_layer_BN > 0].mean())
    return 1.0


def bound_with_heads(spec: Spec, result, num_layers: int, shallow: int, h: float) -> float:
    """`layer_bound` with every exit head counted as `h` layers (the full model pays one per token).

    FREE: one head per token at S and one per deep pass; static: one at k; CALM (and FREE with
    many exits): one at every exit it tests up to where the token leaves, and the final one.
    """
    p = result.exit_rate(num_layers)
    if isinstance(spec, FreeSpec) and not _many(spec):
        s = _free_shallow(spec, shallow)
        return (num_layers + h) / (s + h + (1 - p) * (num_layers - s + h))
    if isinstance(spec, StaticSpec):
        return (num_layers + h) / (spec.exit_layer + h)
    if isinstance(spec, CalmSpec | FreeSpec):
        exit_layer = np.asarray(result.exit_layer)
        exit_layer = exit_layer[exit_layer > 0].astype(np.float64)
        exits = spec.exits if spec.exits is not None else range(spec.min_exit, num_layers)
        tested = np.searchsorted(np.asarray(exits), exit_layer, side="right")
        tested = tested + (exit_layer == num_layers)
        return (num_layers + h) / float(np.mean(exit_layer + h * tested))
    return 1.0


def component_times(config, params, enc: np.ndarray, window: int, repeats: int = 20) -> dict:
    """Milliseconds of one decoding step's pieces at this batch size (jitted, median of repeats).

    `layer`: one decoder layer on one position; `head`: the exit head with its confidence (the
    shared final norm, the LM head, softmax top-1 minus top-2); `deep[C]`: the deep layers [S, L)
    on a chunk of C positions, C in FREE's pass widths; `head_rows[C]`: the exit head on C
    positions (what a FREE pass with records pays). They explain the table: the LM head is paid
    at every exit FREE or CALM tests, and a pass over C positions costs deep[C].
    """
    b, shallow, num_layers = enc.shape[0], config.shallow_layer, config.num_decoder_layers
    enc = jnp.asarray(enc)

    inner = 8  # each piece runs this many times inside one jitted loop: no per-call dispatch,
    # and the key/value cache is carried (updated in place) instead of rebuilt for every call

    def looped(piece):
        """A jitted function running `inner` dependent calls of `piece`, and ms per call."""

        def run(p, x, cache, ctx):
            def body(_, carry):
                x, cache = carry
                y, cache = piece(p, x, cache, ctx)
                # the next call's input depends on this one's output, so none is skipped
                return x + 1e-6 * jnp.mean(y).astype(x.dtype), cache

            return jax.lax.fori_loop(0, inner, body, (x, cache))[0]

        return jax.jit(run)

    def layers(start, end):
        def piece(p, hidden, cache, ctx):
            return bind(config, p).layers(
                hidden, start=start, end=end, cache=cache, context=ctx, offset_B=ctx.base_B + 60
            )

        return looped(piece)

    def head_piece(p, rows_RD, cache, ctx):
        logits = bind(config, p).exit_logits(rows_RD)
        return conf_lib.softmax_margin(logits), cache

    def ms(fn, x):
        seconds = timed_runs(lambda: fn(params, x, cache, ctx), repeats)[1]
        return 1000 * seconds / inner

    # the model's context (T5: encoder output; decoder-only: the prompt prefilled) and caches
    ctx, cache = jax.jit(lambda p: bind(config, p).start(enc, None, extra_length=128))(params)
    hidden = lambda c: jnp.ones((b, c, config.d_model), config.compute_dtype)
    head = looped(head_piece)
    rows = lambda c: hidden(c).reshape(b * c, config.d_model)
    return {
        "layer": ms(layers(0, 1), hidden(1)),
        "head": ms(head, rows(1)),
        "deep": {c: ms(layers(shallow, num_layers), hidden(c)) for c in pass_widths(window)},
        "head_rows": {c: ms(head, rows(c)) for c in pass_widths(window)},
    }


def pieces_bound(spec: Spec, result, parts: dict, num_layers: int, shallow: int) -> float | None:
    """FREE's speedup over full greedy if its loop cost nothing beyond its measured pieces.

    Full greedy pays L layers and a head per step; FREE one shallow step (S layers and a head)
    per iteration plus, for each deep pass, deep[C] at the width C it ran at and the deep exit's
    head (on every covered row when it keeps records, on one row per example otherwise). Unlike
    the layer-count bounds this charges a pass what it costs at its width on this machine, so
    `speedup / pieces_bound` isolates the loop's own overhead. None for other decoders.
    """
    if not isinstance(spec, FreeSpec) or _many(spec):
        return None
    shallow = _free_shallow(spec, shallow)
    steps_per_example = np.asarray(result.lengths).max()  # greedy's loop runs this many steps
    greedy_ms = steps_per_example * (num_layers * parts["layer"] + parts["head"])
    counts = np.asarray(result.pass_width_counts)
    widths = list(parts["deep"])
    passes_ms = sum(
        n * (parts["deep"][c] + (parts["head_rows"][c] if spec.records else parts["head"]))
        for n, c in zip(counts, widths, strict=True)
    )
    free_ms = int(result.num_steps) * (shallow * parts["layer"] + parts["head"]) + passes_ms
    return float(greedy_ms / free_ms)


def step_costs(parts: dict, shallow: int, records: bool = True) -> StepCosts:
    """FREE's step costs (`deferral.StepCosts`, ms) from `component_times` pieces: a shallow step is
    S layers and the exit head; a pass of width C is the deep layers over C rows and the exit head
    on C rows (on one row without records). A first version fitted these to whole FREE runs by
    least squares; it read a width-4 pass at batch 8 as barely dearer than a width-1 pass and chose
    a policy that ran 0.50x greedy where FREE ran 0.76x. The pieces charge each width what it costs.
    """
    return StepCosts(
        shallow=shallow * parts["layer"] + parts["head"],
        deep={c: parts["deep"][c] + (parts["head_rows"][c] if records else parts["head"])
              for c in parts["deep"]},
    )  # fmt: skip
