"""FREE's synchronized parallel decoding (Bae et al. 2023), its rollback policy, and lossless mode.

Each step runs the shallow layers [0, S) for every example and tests the shallow exit:
* confident (confidence > threshold): the token comes from the shallow exit and the layer-S input
  hidden state of its position is pushed on the example's stack;
* otherwise the deep layers [S, L) run once over the stacked positions plus the current one, in
  parallel and causally masked, writing exact deep key/values for all of them; the deep exit gives
  the current token; the stack empties.

The deep layers see at a stacked position exactly the layer-S input a full forward pass would
compute there, so after a pass the deep caches equal those of running every token through every
layer (tested). A pass covers at most W positions (the window): W - 1 stacked plus the current one,
so a stack holding W - 1 positions forces a pass.

Batching. The pass runs for the whole batch or not at all; when it runs every unfinished example
flushes its stack in it (the pass costs the same) and an example that was confident keeps its
shallow token. The pass runs at the smallest static width in (1, 2, 4, ..., W) covering the
largest stack in the batch (`lax.switch`): it pays for the width it is given, not the window.
With a deferral policy (`deferral.py`; `min_waiting`, `max_wait`) an example that needs the deep
layers may instead wait at its position while the others keep taking shallow steps, until enough
examples wait (or one has waited long enough, or all do); its token is the same either way.

Loop structure. The shallow steps run in an inner `while_loop` (`shallow_step`) that carries only
what they touch; it stops at the first step whose batch needs the deep layers, and the outer loop
body (`sync_step`) runs that pass and settles the step. A step that exits thus costs about what a
static-exit step costs: no conditional, no deep-cache traffic.

Worked example (W = 4, one example, c = confident, d = not):
    step:      0   1   2   3   4   5   6
    decision:  c   c   d   c   c   c   c
    stack:     1   2   0   1   2   3→0 1      step 5 holds W - 1 = 3 stacked: forced pass of 4
    pass:      -   -   3   -   -   4   -      positions 0..2, then 3..5 (5 keeps its shallow token)

Modes (static):
  "plain"     FREE as published, without rollback.
  "rollback"  FREE's rollback policy, as in the reference `deploying_t5.py`: after a pass, the first
              shallow-emitted position whose deep cross-entropy on the shallow token exceeds
              `rollback_threshold` takes the deep token, and decoding resumes after it (later
              positions are discarded and redone).
  "lossless"  every shallow-emitted token that differs from the deep argmax at its position is
              rejected the same way; the output equals full-model greedy at any threshold.
In the two verifying modes a shallow EOS or a token at the maximum length forces a pass, so no
token is final before the deep layers have checked it. Rejections are taken in position order, so a
batch decodes to the same tokens as each example alone.

Many exits (`exits=(E_0, ..., E_{m-1})`, e.g. self-supervised exit heads; one threshold per
exit). A token leaves at the first exit whose confidence passes that exit's threshold. Each stacked
position remembers the exit it has been carried to (its *frontier*: the deep key/values below it
are exact, its hidden state there is on the stack). When the current token fails exit j, the
layers [E_j, E_{j+1}) run once over every stacked position whose frontier is E_j plus the current
one, each entering at its own frontier; frontiers never increase along the stack, so that is a
contiguous suffix and no cache row is ever written twice or left missing. The current token then
tests exit j + 1, and so on; only a pass that reaches layer L flushes the stack (and verifies, in
the verifying modes). With one exit this is FREE exactly as above.

    exits (2, 4), L = 6, one example; c_j = leaves at exit j, d = fails both:
    step:      0     1     2               3
    decision:  c_0   c_0   d(2->4->6)      c_0
    frontier:  2     2,2   pass [2,4) over rows 0..2, [4,6) over rows 0..2; stack empty
                                           2

Records: every position a pass covers yields (shallow confidence, shallow argmax == deep argmax),
stored by position in `AgreementRecords` (the current position is included; the reference records
a pass only when its stack is non-empty). Positions discarded by a rollback lose their records.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from free_jax.decoding import confidence as conf_lib
from free_jax.decoding.state import (
    AgreementRecords,
    DecodeResult,
    FreeState,
    TokenLog,
    decode_setup,
    result_from_log,
    run_layers,
    start_fields,
)

MODES = ("plain", "rollback", "lossless")


def pass_widths(window: int) -> tuple[int, ...]:
    """Static widths of the deep pass: powers of two below the window, then the window.

    >>> pass_widths(8), pass_widths(6), pass_widths(1)
    ((1, 2, 4, 8), (1, 2, 4, 6), (1,))
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    widths, w = [], 1
    while w < window:
        widths.append(w)
        w *= 2
    return (*widths, window)


def free_bound(num_layers: int, shallow: int, exit_rate: float) -> float:
    """FREE's decoder-compute bound L / (S + (1 - p)(L - S)): its speedup over the full model if
    only decoder layers cost, at exit rate p.

    >>> free_bound(8, 2, 1.0), free_bound(8, 2, 0.0)
    (4.0, 1.0)
    """
    return num_layers / (shallow + (1.0 - exit_rate) * (num_layers - shallow))


def _take_rows(a_BN: jax.Array, idx_BM: jax.Array) -> jax.Array:
    """a_BN[b, idx_BM[b, m]] with indices clipped into range."""
    return jnp.take_along_axis(a_BN, jnp.clip(idx_BM, 0, a_BN.shape[1] - 1), axis=1)


def _take_slots(a_BWD: jax.Array, idx_BM: jax.Array) -> jax.Array:
    """a_BWD[b, idx_BM[b, m]] ([B, M, D]) with slot indices clipped into range."""
    idx_BM1 = jnp.clip(idx_BM, 0, a_BWD.shape[1] - 1)[:, :, None]
    return jnp.take_along_axis(a_BWD, idx_BM1, axis=1)


def check_exits(config, exits: tuple[int, ...], what: str = "exits") -> None:
    """Exit layers must be strictly increasing proper intermediate layers of the decoder."""
    if not exits:
        raise ValueError(f"{what} is empty: give one or more exit layers")
    for layer in exits:
        config.check_exit_layer(layer, what=what)
    if any(b <= a for a, b in zip(exits, exits[1:])):
        raise ValueError(f"{what}={tuple(exits)!r} must be strictly increasing")


def free_loop(
    config,
    params,
    inputs_BS: jax.Array,
    threshold,
    *,
    max_decode_len: int,
    input_lengths_B=None,
    window: int = 8,
    measure: str = "softmax_margin",
    mode: str = "plain",
    rollback_threshold=jnp.inf,
    position_temp=0.0,
    max_lengths_B=None,
    confidence_params=None,
    records: bool = True,
    exits: tuple[int, ...] | None = None,
    min_waiting=1,
    max_wait=0,
    trigger_hook=None,
) -> FreeState:
    """Runs FREE to the end and returns the final loop state (caches included); see the module doc.

    Args:
      config, params: the model; S = config.shallow_layer unless `exits` are given.
      inputs_BS: [B, S] int32 encoder tokens, 0 is padding (T5), or right-padded prompts
        (decoder-only: prefilled through every layer, so the first pass is exact too).
      threshold: traced scalar, or [m] (one per exit); a token exits at exit j when its
        confidence there > threshold[j].
      max_decode_len: N, static.
      input_lengths_B: [B] prompt lengths (decoder-only; None: full rows).
      window: W, static: most positions in one deep pass.
      measure: shallow confidence measure (see `confidence.py`).
      mode: "plain", "rollback" or "lossless" (static).
      rollback_threshold: traced; "rollback" rejects a shallow token whose deep cross-entropy
        exceeds it.
      position_temp: traced; CALM-style threshold decay over positions (0: none).
      max_lengths_B: optional [B] per-example maximum lengths.
      confidence_params: `ConfidenceHead` parameters for measure "learned".
      records: static; keep the agreement records. Without them (and in "plain" mode) the deep
        exit reads only each example's current position, which makes a pass cheaper where the LM
        head is costly (large vocabularies on CPU); with a measure that reads no logits
        ("hidden_cosine", "learned") and one exit, the head at S also runs only in steps where a
        token leaves there: one LM head per token.
      exits: static increasing exit layers in [1, L) (None: (S,)); see the module doc.
      min_waiting, max_wait: traced deferral policy (`deferral.py`): the deep pass runs once at
        least `min_waiting` examples wait for it, or one has waited `max_wait` shallow steps, or
        every unfinished example waits; (1, 0) runs it as soon as one example needs it.
      trigger_hook: static, tests only: `hook(state) -> [] bool` runs the pass early (whenever
        some example waits and the hook says so), to force arbitrary schedules.
    """
    conf_lib.check_measure(measure)
    if mode not in MODES:
        raise ValueError(f"unknown FREE mode {mode!r}; expected one of {MODES}")
    verify = mode != "plain"
    exits = (config.shallow_layer,) if exits is None else tuple(int(x) for x in exits)
    check_exits(config, exits)
    m = len(exits)
    if m > 1 and measure == "hidden_cosine":
        raise ValueError("measure 'hidden_cosine' supports one exit only (FREE's S)")
    threshold_E = jnp.broadcast_to(jnp.asarray(threshold, jnp.float32), (m,))
    bounds = (*exits, config.num_decoder_layers)  # segment j runs layers [bounds[j], bounds[j+1])
    # slack: a pass near the end writes up to W rows
    setup = decode_setup(
        config, params, inputs_BS, max_decode_len, max_lengths_B,
        input_lengths_B=input_lengths_B, slack=window,
    )  # fmt: skip
    model, ctx, b, n, max_len_B = setup.model, setup.ctx, setup.batch, setup.length, setup.max_len_B
    w, num_layers, shallow = window, config.num_decoder_layers, exits[0]
    widths = pass_widths(w)
    rows_W = jnp.arange(w, dtype=jnp.int32)

    current_only = mode == "plain" and not records
    # One LM head per token: at S only where a token leaves, in a pass only at the current row.
    head_once = current_only and m == 1 and measure in conf_lib.HIDDEN_MEASURES

    last = bounds[-2]  # the deep pass's first layer: the highest exit

    def deep_pass(width: int):
        def run(chunk_BWD, proposed_BW, start_B, cache, stack_len_B):
            hidden_BCD, cache = model.layers(
                chunk_BWD[:, :width], start=last, end=num_layers, cache=cache, context=ctx,
                offset_B=ctx.base_B + start_B,
            )  # fmt: skip
            if current_only:  # one row per example: the current position's deep token
                row_B11 = jnp.minimum(stack_len_B, width - 1)[:, None, None]
                hidden_BD = jnp.take_along_axis(hidden_BCD, row_B11, axis=1)[:, 0]
                deep_B = jnp.argmax(model.exit_logits(hidden_BD), axis=-1).astype(jnp.int32)
                deep_BW = jnp.where(rows_W[None, :] == stack_len_B[:, None], deep_B[:, None], 0)
                return deep_BW, jnp.zeros((b, w), jnp.float32), cache
            logits_BCV = model.exit_logits(hidden_BCD)
            deep_BC = jnp.argmax(logits_BCV, axis=-1).astype(jnp.int32)
            if mode == "rollback":
                picked_BC = jnp.take_along_axis(logits_BCV, proposed_BW[:, :width, None], axis=-1)[
                    ..., 0
                ]
                nll_BC = jax.nn.logsumexp(logits_BCV, axis=-1) - picked_BC
            else:
                nll_BC = jnp.zeros(deep_BC.shape, jnp.float32)
            pad = lambda x: jnp.pad(x, ((0, 0), (0, w - width)))
            return pad(deep_BC), pad(nll_BC), cache

        return run

    def no_pass(chunk_BWD, proposed_BW, start_B, cache, stack_len_B):
        return jnp.zeros((b, w), jnp.int32), jnp.zeros((b, w), jnp.float32), cache

    branches = [no_pass] + [deep_pass(width) for width in widths]

    def mid_pass(j: int, width: int):
        """Segment j < m - 1: layers [E_j, E_{j+1}) over a chunk; hidden padded to [B, W, D]."""

        def run(chunk_BWD, start_B, cache):
            hidden_BCD, cache = model.layers(
                chunk_BWD[:, :width], start=bounds[j], end=bounds[j + 1], cache=cache,
                context=ctx, offset_B=ctx.base_B + start_B,
            )  # fmt: skip
            return jnp.pad(hidden_BCD, ((0, 0), (0, w - width), (0, 0))), cache

        return run

    def mid_branches(j: int):
        skip = lambda chunk_BWD, start_B, cache: (chunk_BWD, cache)
        return [skip] + [mid_pass(j, width) for width in widths]

    def width_of(rows_B, active_B):
        """Index into `widths` of the narrowest static width covering every active row count."""
        widest = jnp.max(jnp.where(active_B, rows_B, 1))
        return jnp.searchsorted(jnp.asarray(widths, jnp.int32), widest, side="left")

    def ends(token_B, pos_B):
        """[B] bool: a token emitted at pos_B finishes its example (EOS or maximum length)."""
        return (token_B == config.eos_token_id) | (pos_B + 1 >= max_len_B)

    def exit_threshold(s: FreeState, j: int):
        """[B] exit j's threshold at each example's position (position-decayed)."""
        return conf_lib.decayed_threshold(threshold_E[j], s.pos_B + 1, n, position_temp)

    def forced(s: FreeState, settled_B, token_B):
        """[B] the current position must reach layer L: the stack plus it fill the window, or (in
        the verifying modes) its exit token would end the example unchecked."""
        force_B = s.stack_len_B + 1 >= w
        if verify:  # nothing becomes final unchecked
            force_B |= settled_B & ends(token_B, s.pos_B)
        return force_B

    min_waiting_ = jnp.asarray(min_waiting, jnp.int32)
    max_wait_ = jnp.asarray(max_wait, jnp.int32)

    def run_pass(s: FreeState, need_B, active_B):
        """[] bool: the step's deep pass runs now (the deferral policy; see `deferral.py`)."""
        count = jnp.sum(need_B)
        due = (count >= min_waiting_) | jnp.any(need_B & (s.wait_B >= max_wait_))
        due |= count == jnp.sum(active_B)  # nobody could advance
        if trigger_hook is not None:
            due |= trigger_hook(s)
        return (count > 0) & due

    def shallow_step(s: FreeState) -> FreeState:
        """One position through [0, S): advances when no example needs the deep layers, else
        leaves the step pending (its shallow outputs kept) for `sync_step`."""
        active_B = ~s.done_B
        offset_B = ctx.base_B + s.pos_B
        h0_B1D = model.embed(s.last_token_B[:, None], offset_B)
        hidden_B1D, prev_B1D, cache = run_layers(
            model, h0_B1D, 0, shallow, cache=s.cache, ctx=ctx, offset_B=offset_B,
            need_prev=measure == "hidden_cosine",
        )  # fmt: skip
        prev_BD = None if prev_B1D is None else prev_B1D[:, 0]
        if head_once:
            # The decision needs no vocabulary distribution, and plain FREE without records
            # never reads the shallow token of a position that goes deep: pay the LM head at S
            # only in steps where some example leaves there.
            conf_B = conf_lib.hidden_confidence(
                model, measure, hidden_B1D[:, 0], prev_BD, confidence_params
            )
            exit_B = conf_lib.exits(conf_B, exit_threshold(s, 0))
            logits_BV = jax.lax.cond(
                jnp.any(exit_B & active_B),
                lambda h_BD: model.exit_logits(h_BD, layer=shallow).astype(jnp.float32),
                lambda h_BD: jnp.zeros((b, config.vocab_size), jnp.float32),
                hidden_B1D[:, 0],
            )
        else:
            logits_BV, conf_B = conf_lib.exit_confidence(
                model, measure, hidden_B1D[:, 0], prev_BD, confidence_params, layer=shallow
            )
            exit_B = conf_lib.exits(conf_B, exit_threshold(s, 0))
        shallow_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        finished_B = ends(shallow_B, s.pos_B)
        need_B = active_B & (~exit_B | forced(s, exit_B, shallow_B))
        pending = run_pass(s, need_B, active_B)
        # the current position's layer-S input takes slot stack_len whether or not a pass follows
        stack_BWD = jnp.where(
            (rows_W[None, :] == s.stack_len_B[:, None])[:, :, None], hidden_B1D, s.stack_BWD
        )
        # without a pass, an example that exited emits and stacks; one that needs the deep
        # layers waits at its position (its next step recomputes this one, identically)
        push_B = active_B & ~pending & ~need_B
        wait_B = jnp.where(~pending & need_B, s.wait_B + 1, s.wait_B)
        at_current_BW = rows_W[None, :] == s.stack_len_B[:, None]
        return s.replace(
            stack_exit_BW=jnp.where(at_current_BW, 0, s.stack_exit_BW),
            pos_B=s.pos_B + push_B.astype(jnp.int32),
            last_token_B=jnp.where(push_B, shallow_B, s.last_token_B),
            cache=cache,
            stack_BWD=stack_BWD,
            stack_len_B=s.stack_len_B + push_B.astype(jnp.int32),
            log=s.log.write(s.pos_B, push_B, shallow_B, jnp.full_like(shallow_B, shallow), conf_B),
            done_B=s.done_B | (push_B & finished_B),
            layers_B=s.layers_B + shallow * push_B.astype(jnp.int32),
            batch_layers=s.batch_layers + shallow * (~pending).astype(jnp.int32),
            iterations=s.iterations + (~pending).astype(jnp.int32),
            wait_B=wait_B,
            pending=pending,
            shallow_token_B=shallow_B,
            shallow_conf_B=conf_B,
            exit_B=exit_B,
        )

    def climb(s: FreeState, part_B):
        """The current position fails exit 0; with m > 1 exits, carry it (and every stacked
        position at its frontier) from exit to exit until it leaves or must reach layer L.

        Returns (settled_B, token_B, conf_B, exit_index_B, going_B, stack_BWD, stack_exit_BW,
        cache, layers_B, batch_layers): whether it left at an exit, the last tested exit's argmax
        and confidence, the exit it left at, whether it still needs the pass from the highest exit
        to L, and the updated stack, frontiers, caches and counters.
        """
        settled_B, token_B, conf_B = s.exit_B, s.shallow_token_B, s.shallow_conf_B
        exit_index_B = jnp.zeros((b,), jnp.int32)
        force_B = forced(s, settled_B, token_B)
        going_B = part_B & (~settled_B | force_B)
        stack_BWD, stack_exit_BW, cache = s.stack_BWD, s.stack_exit_BW, s.cache
        layers_B, batch_layers = s.layers_B, s.batch_layers
        for j in range(m - 1):
            run = jnp.any(going_B)
            # rows at frontier E_j: a suffix of the stack ending at the current slot
            at_j_BW = (stack_exit_BW == j) & (rows_W[None, :] <= s.stack_len_B[:, None])
            k_B = jnp.sum(at_j_BW, axis=1).astype(jnp.int32)
            first_B = s.stack_len_B + 1 - k_B
            chunk_BWD = _take_slots(stack_BWD, first_B[:, None] + rows_W[None, :])
            branch = jnp.where(run, 1 + width_of(k_B, part_B), 0)
            out_BWD, cache = jax.lax.switch(
                branch, mid_branches(j), chunk_BWD, s.pos_B + 1 - k_B, cache
            )
            moved_BW = at_j_BW & (part_B & run)[:, None]
            back_BWD = _take_slots(out_BWD, rows_W[None, :] - first_B[:, None])
            stack_BWD = jnp.where(moved_BW[:, :, None], back_BWD, stack_BWD)
            stack_exit_BW = jnp.where(moved_BW, j + 1, stack_exit_BW)
            span = bounds[j + 1] - bounds[j]
            layers_B = layers_B + span * (part_B & run).astype(jnp.int32)
            batch_layers = batch_layers + span * run.astype(jnp.int32)

            def test(hidden_BD, layer=exits[j + 1]):
                logits_BV, c_B = conf_lib.exit_confidence(
                    model, measure, hidden_BD, None, confidence_params, layer=layer
                )
                return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32), c_B

            def no_test(hidden_BD):
                return jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.float32)

            current_BD = _take_slots(out_BWD, (k_B - 1)[:, None])[:, 0]
            tok_B, c_B = jax.lax.cond(run, test, no_test, current_BD)
            tested_B = part_B & ~settled_B  # empty when the segment did not run
            leave_B = tested_B & conf_lib.exits(c_B, exit_threshold(s, j + 1))
            token_B = jnp.where(tested_B, tok_B, token_B)
            conf_B = jnp.where(tested_B, c_B, conf_B)
            exit_index_B = jnp.where(leave_B, j + 1, exit_index_B)
            settled_B = settled_B | leave_B
            force_B = force_B | forced(s, leave_B, tok_B)
            going_B = part_B & (~settled_B | force_B)
        return (
            settled_B, token_B, conf_B, exit_index_B, going_B, stack_BWD, stack_exit_BW, cache,
            layers_B, batch_layers,
        )  # fmt: skip

    def sync_step(s: FreeState) -> FreeState:
        """Finishes a pending step: the current position climbs the exits (`climb`); if some
        example still needs layer L, one deep pass from the highest exit runs over every active
        example's stack plus its current position, then accept / reject / emit; otherwise every
        current position is stacked at the exit it left from. Without a pending step (the batch
        finished, or the iteration cap) nothing runs."""
        active_B = ~s.done_B
        ran = s.pending
        part_B = active_B & ran
        (
            settled_B, cur_token_B, cur_conf_B, exit_index_B, going_B, stack_BWD, stack_exit_BW,
            cache, layers_B, batch_layers,
        ) = climb(s, part_B)  # fmt: skip
        full = jnp.any(going_B)  # with one exit: exactly `ran`
        served_B = part_B & (~s.exit_B | forced(s, s.exit_B, s.shallow_token_B))
        flush_B = part_B & full
        rows_B = s.stack_len_B + 1  # stacked positions plus the current one
        start_B = s.pos_B - s.stack_len_B
        is_cur_BW = rows_W[None, :] == s.stack_len_B[:, None]
        row_pos_BW = start_B[:, None] + rows_W[None, :]
        proposed_BW = jnp.where(
            is_cur_BW, cur_token_B[:, None], _take_rows(s.log.tokens, row_pos_BW)
        )
        row_conf_BW = jnp.where(
            is_cur_BW, cur_conf_B[:, None], _take_rows(s.log.confidence, row_pos_BW)
        )
        width_index = width_of(rows_B, active_B)
        branch = jnp.where(full, 1 + width_index, 0)
        deep_BW, nll_BW, cache = jax.lax.switch(
            branch, branches, stack_BWD, proposed_BW, start_B, cache, s.stack_len_B
        )

        # ------------------------------------------ accept, reject, emit
        in_pass_BW = flush_B[:, None] & (rows_W[None, :] < rows_B[:, None])
        exited_row_BW = (rows_W[None, :] < s.stack_len_B[:, None]) | (
            is_cur_BW & settled_B[:, None]
        )
        candidate_BW = in_pass_BW & exited_row_BW
        if mode == "lossless":
            reject_BW = candidate_BW & (deep_BW != proposed_BW)
        elif mode == "rollback":
            reject_BW = candidate_BW & (nll_BW > jnp.asarray(rollback_threshold, jnp.float32))
        else:
            reject_BW = jnp.zeros_like(candidate_BW)
        reject_B = jnp.any(reject_BW, axis=1)
        final_row_B = jnp.where(reject_B, jnp.argmax(reject_BW, axis=1), s.stack_len_B)
        final_pos_B = start_B + final_row_B
        take_final = lambda a_BW: jnp.take_along_axis(a_BW, final_row_B[:, None], axis=1)[:, 0]
        deep_final_B = take_final(deep_BW)
        keep_B = settled_B & ~reject_B
        token_B = jnp.where(keep_B, cur_token_B, deep_final_B)
        token_exit_B = jnp.where(keep_B, jnp.asarray(exits, jnp.int32)[exit_index_B], num_layers)
        log = s.log.write(final_pos_B, part_B, token_B, token_exit_B, take_final(row_conf_BW))

        # records of every position the pass covered, laid out by position
        offset_BN = jnp.arange(n, dtype=jnp.int32)[None, :] - start_B[:, None]
        covered_BN = flush_B[:, None] & (offset_BN >= 0) & (offset_BN < rows_B[:, None])
        by_pos = lambda a_BW: _take_rows(a_BW, offset_BN)
        if records:
            new_records = AgreementRecords(
                confidence=jnp.where(covered_BN, by_pos(row_conf_BW), s.records.confidence),
                agree=jnp.where(covered_BN, by_pos(deep_BW == proposed_BW), s.records.agree),
                valid=s.records.valid | covered_BN,
            )
        else:
            new_records = s.records
        if verify:  # a rejection discards every later position
            keep_BN = ~(
                reject_B[:, None] & (jnp.arange(n, dtype=jnp.int32)[None, :] > final_pos_B[:, None])
            )
            log = TokenLog(
                tokens=log.tokens * keep_BN,
                exit_layer=log.exit_layer * keep_BN,
                confidence=log.confidence * keep_BN,
            )
            new_records = AgreementRecords(
                confidence=new_records.confidence * keep_BN,
                agree=new_records.agree & keep_BN,
                valid=new_records.valid & keep_BN,
            )

        flush_i, deep_span = flush_B.astype(jnp.int32), num_layers - last
        finished_B = ends(token_B, final_pos_B)
        stacked_B = s.stack_len_B + part_B.astype(jnp.int32)  # no pass: the current is stacked
        return s.replace(
            pos_B=jnp.where(part_B, final_pos_B + 1, s.pos_B),
            last_token_B=jnp.where(part_B, token_B, s.last_token_B),
            cache=cache,
            stack_BWD=stack_BWD,
            stack_exit_BW=stack_exit_BW,
            stack_len_B=jnp.where(flush_B, 0, stacked_B),
            log=log,
            records=new_records,
            done_B=s.done_B | (part_B & finished_B),
            deep_B=s.deep_B + flush_i,
            layers_B=layers_B + shallow * part_B.astype(jnp.int32) + deep_span * flush_i,
            rollbacks_B=s.rollbacks_B + (reject_B & part_B).astype(jnp.int32),
            batch_layers=batch_layers
            + shallow * ran.astype(jnp.int32)
            + deep_span * full.astype(jnp.int32),
            iterations=s.iterations + ran.astype(jnp.int32),
            width_counts_P=s.width_counts_P.at[width_index].add(full.astype(jnp.int32)),
            wait_B=jnp.where(part_B, 0, s.wait_B),
            served_B=s.served_B + served_B.astype(jnp.int32),
            waited_B=s.waited_B + jnp.where(served_B, s.wait_B, 0),
            longest_wait_B=jnp.maximum(s.longest_wait_B, jnp.where(served_B, s.wait_B, 0)),
            pending=jnp.zeros((), bool),
        )

    # Each pass makes at least its first covered position final, and at most W - 1 steps run
    # between passes, so N * W iterations suffice; with deferral, every step without a pass
    # advances some example, which at most (B + 1) times as many bounds.
    max_iterations = n * w * (b + 1) + 1
    running = lambda s: ~jnp.all(s.done_B) & (s.iterations < max_iterations)

    def body(s: FreeState) -> FreeState:
        # Shallow steps run in an inner loop of their own until some example needs the deep
        # layers, so a step that exits touches neither the deep caches nor a conditional (on
        # small models the per-step bookkeeping, not the layers, was what cost).
        s = jax.lax.while_loop(lambda s: ~s.pending & running(s), shallow_step, s)
        return sync_step(s)

    state = FreeState(
        **start_fields(setup),
        pos_B=jnp.zeros((b,), jnp.int32),
        cache=setup.cache,
        stack_BWD=jnp.zeros((b, w, config.d_model), config.compute_dtype),
        stack_exit_BW=jnp.zeros((b, w), jnp.int32),
        stack_len_B=jnp.zeros((b,), jnp.int32),
        records=AgreementRecords.empty(b, n),
        deep_B=jnp.zeros((b,), jnp.int32),
        layers_B=jnp.zeros((b,), jnp.int32),
        rollbacks_B=jnp.zeros((b,), jnp.int32),
        batch_layers=jnp.zeros((), jnp.int32),
        iterations=jnp.zeros((), jnp.int32),
        width_counts_P=jnp.zeros((len(widths),), jnp.int32),
        wait_B=jnp.zeros((b,), jnp.int32),
        served_B=jnp.zeros((b,), jnp.int32),
        waited_B=jnp.zeros((b,), jnp.int32),
        longest_wait_B=jnp.zeros((b,), jnp.int32),
        pending=jnp.zeros((), bool),
        shallow_token_B=jnp.zeros((b,), jnp.int32),
        shallow_conf_B=jnp.zeros((b,), jnp.float32),
        exit_B=jnp.zeros((b,), bool),
    )
    return jax.lax.while_loop(running, body, state)


def free_decode(config, params, inputs_BS, threshold, **kw) -> DecodeResult:
    """FREE decoding; options as in `free_loop`. Returns a `DecodeResult` with records."""
    final = free_loop(config, params, inputs_BS, threshold, **kw)
    return result_from_log(
        final.log,
        num_deep_passes=final.deep_B,
        layers_computed=final.layers_B,
        batch_layers_computed=final.batch_layers,
        num_steps=final.iterations,
        records=final.records,
        num_rollbacks=final.rollbacks_B,
        pass_width_counts=final.width_counts_P,
        num_served=final.served_B,
        wait_steps=final.waited_B,
        max_wait=final.longest_wait_B,
    )


def free_lossless_decode(config, params, inputs_BS, threshold, **kw):
    """FREE in lossless mode: equals full-model greedy at any threshold."""
    return free_decode(config, params, inputs_BS, threshold, mode="lossless", **kw)
