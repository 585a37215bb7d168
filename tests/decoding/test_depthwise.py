"""Continuous depth-wise batching: greedy equivalence, slot/order independence, refills, tick counts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from free_jax.decoding.api import decode
from free_jax.decoding.depthwise import depthwise_decode, tick_plan
from free_jax.decoding.specs import DepthwiseSpec, GreedySpec
from free_jax.models import init_params
from free_jax.models.recursive import TINY, RecursiveConfig

NEVER, ALWAYS = 2.0, -1.0  # thresholds: softmax confidences lie in [0, 1]


def _model(sharing: str, layers: int, rank: int, sharpen: float = 1.0):
    """A random recursive model; `sharpen` scales the final norm so that softmax confidences
    spread over [0, 1] (a random model's are all near 1/V) and thresholds force exit rates."""
    c = RecursiveConfig(**TINY, num_layers=layers, num_loops=3, sharing=sharing, lora_rank=rank)
    params = init_params(c, jax.random.key(0))
    if rank:  # non-zero adapters, so that every layer differs from its block
        params["relax"] = jax.tree.map(
            lambda x: x + 0.05 * jax.random.normal(jax.random.key(3), x.shape), params["relax"]
        )
    norm = params["decoder"]["final_norm"]
    params["decoder"]["final_norm"] = {**norm, "scale": norm["scale"] * sharpen}
    return c, params


def _requests(q: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 5, size=q)
    prompts = rng.integers(3, TINY["vocab_size"], size=(q, 4))
    return jnp.asarray(prompts, jnp.int32), jnp.asarray(lengths, jnp.int32)


def _emitted(result) -> list[np.ndarray]:
    """Each request's tokens up to and including its EOS."""
    loops = np.asarray(result.exit_loop_QN)
    return [np.asarray(result.tokens_QN)[i, loops[i] >= 0] for i in range(loops.shape[0])]


@pytest.mark.parametrize("sharing, layers, rank", [("cycle", 6, 3), ("middle_cycle", 8, 0)])
def test_never_exit_equals_greedy_decoding_of_the_recursive_model(sharing, layers, rank):
    c, params = _model(sharing, layers, rank)
    prompts, lengths = _requests(5)
    spec = DepthwiseSpec(slots=2, max_new_tokens=6)
    got = depthwise_decode(c, params, prompts, lengths, spec, threshold=NEVER)
    want = decode(c, params, prompts, GreedySpec(), max_decode_len=6, prompt_lengths=lengths)
    assert (np.asarray(got.exit_loop_QN)[np.asarray(got.exit_loop_QN) >= 0] == 2).all()
    for i, tokens in enumerate(_emitted(got)):
        np.testing.assert_array_equal(tokens, np.asarray(want.tokens)[i, : len(tokens)])
        assert len(tokens) == int(want.lengths[i])


@pytest.mark.parametrize(
    "sharing, layers, rank, skipped_kv",
    [("cycle", 6, 3, "copy_state"),
     pytest.param("middle_cycle", 8, 0, "share_loop0", marks=pytest.mark.slow),
     pytest.param("cycle", 6, 3, "share_loop0", marks=pytest.mark.slow),
     pytest.param("middle_cycle", 8, 0, "copy_state", marks=pytest.mark.slow)],
)  # fmt: skip
def test_exits_do_not_depend_on_slots_order_or_synchronisation(sharing, layers, rank, skipped_kv):
    c, params = _model(sharing, layers, rank, sharpen=40.0)
    prompts, lengths = _requests(7)
    run = lambda p, n, **kw: depthwise_decode(
        c, params, p, n, DepthwiseSpec(max_new_tokens=6, skipped_kv=skipped_kv, **kw),
        threshold=0.55,
    )  # fmt: skip
    base = run(prompts, lengths, slots=1)
    loops = np.asarray(base.exit_loop_QN)
    counts = np.bincount(loops[loops >= 0], minlength=3)
    assert counts[0] > 0 and counts[1:].sum() > 0  # a mixture of early and late exits
    for kw in (dict(slots=3), dict(slots=8), dict(slots=3, synchronized=True)):
        other = run(prompts, lengths, **kw)
        np.testing.assert_array_equal(other.tokens_QN, base.tokens_QN)
        np.testing.assert_array_equal(other.exit_loop_QN, base.exit_loop_QN)
    perm = np.array([3, 1, 0, 6, 5, 4, 2])
    shuffled = run(prompts[perm], lengths[perm], slots=3)
    np.testing.assert_array_equal(np.asarray(shuffled.tokens_QN)[np.argsort(perm)], base.tokens_QN)


@pytest.mark.slow  # ~9 s; both rules run in the slot-independence test
def test_skipped_kv_rules_differ_once_tokens_exit_early():
    """The two rules fill different keys/values for skipped loops, which later tokens read: on
    this model 4 of 32 tokens differ at threshold 0.3 (the slot tests are not comparing two
    names for one thing)."""
    c, params = _model("cycle", 6, 3, sharpen=40.0)
    prompts, lengths = _requests(4)
    tokens = [
        np.asarray(
            depthwise_decode(
                c, params, prompts, lengths,
                DepthwiseSpec(slots=2, max_new_tokens=8, skipped_kv=rule), threshold=0.3,
            ).tokens_QN
        )
        for rule in ("copy_state", "share_loop0")
    ]  # fmt: skip
    assert (tokens[0] != tokens[1]).sum() > 0


@pytest.mark.parametrize("seed", [0, *(pytest.param(s, marks=pytest.mark.slow) for s in (1, 2, 3))])
def test_refills_never_drop_or_duplicate_a_request(seed):
    """Random queues, lengths, slot counts and thresholds: every request is served once, its
    tokens are a gap-free prefix ending at its EOS or N, and every slot-loop is accounted for."""
    rng = np.random.default_rng(seed)
    c, params = _model("cycle", 6, 0, sharpen=40.0)
    q, n = int(rng.integers(1, 9)), int(rng.integers(1, 7))
    prompts, lengths = _requests(q, seed=seed + 10)
    for synchronized in (False, True):
        spec = DepthwiseSpec(
            slots=int(rng.integers(1, 5)), max_new_tokens=n, synchronized=synchronized
        )
        result = depthwise_decode(
            c, params, prompts, lengths, spec, threshold=float(rng.uniform(0.2, 0.9))
        )
        loops, tokens = np.asarray(result.exit_loop_QN), np.asarray(result.tokens_QN)
        for i in range(q):
            emitted = int(np.sum(loops[i] >= 0))
            assert (loops[i, :emitted] >= 0).all() and (loops[i, emitted:] == -1).all()
            eos = np.flatnonzero(tokens[i, :emitted] == c.eos_token_id)
            assert emitted == (eos[0] + 1 if eos.size else n)
            assert eos.size <= 1
        assert int(result.busy) == int(np.sum(loops[loops >= 0] + 1))


def _makespan(loops_QN: np.ndarray, slots: int) -> int:
    """Ticks of the continuous engine by hand: request i costs sum(loops + 1) ticks and takes the
    first free slot, in queue order."""
    free_at = [0] * slots
    for cost in np.where(loops_QN >= 0, loops_QN + 1, 0).sum(axis=1):
        slot = int(np.argmin(free_at))
        free_at[slot] += int(cost)
    return max(free_at)


def test_tick_counts_match_hand_counts():
    c, params = _model("cycle", 6, 0, sharpen=40.0)
    assert len(tick_plan(c)) == 2  # two block calls per tick: K = 2 blocks per loop
    prompts, lengths = _requests(3, seed=4)
    n, b = 4, c.num_loops
    never = depthwise_decode(c, params, prompts, lengths, DepthwiseSpec(2, n), threshold=NEVER)
    tokens_never = np.asarray(never.exit_loop_QN) >= 0
    assert tokens_never.sum() == 3 * n, "pick prompts whose greedy outputs have no EOS"
    # Two slots, three requests of N tokens, B ticks a token: two rounds.
    assert int(never.ticks) == 2 * n * b and int(never.busy) == 3 * n * b
    always = depthwise_decode(c, params, prompts, lengths, DepthwiseSpec(2, n), threshold=ALWAYS)
    loops = np.asarray(always.exit_loop_QN)
    assert (loops[loops >= 0] == 0).all()  # one tick a token
    assert int(always.ticks) == _makespan(loops, 2) and int(always.busy) == int(np.sum(loops >= 0))
    # One slot: a tick per loop run; synchronized batches: per step, the deepest member's loops.
    mixed = dict(threshold=0.55)
    one = depthwise_decode(c, params, prompts, lengths, DepthwiseSpec(1, n), **mixed)
    loops = np.asarray(one.exit_loop_QN)
    assert int(one.ticks) == int(np.sum(loops[loops >= 0] + 1))
    sync = depthwise_decode(c, params, prompts, lengths, DepthwiseSpec(3, n, True), **mixed)
    steps = np.where(loops >= 0, loops + 1, 0).max(axis=0)  # the batch of all three requests
    assert int(sync.ticks) == int(steps.sum())
    for slots in (2, 3):
        free = depthwise_decode(c, params, prompts, lengths, DepthwiseSpec(slots, n), **mixed)
        assert int(free.ticks) == _makespan(loops, slots)  # nobody waits for a neighbour


def test_a_new_threshold_does_not_recompile():
    c, params = _model("cycle", 6, 0, sharpen=40.0)
    prompts, lengths = _requests(3)
    spec = DepthwiseSpec(slots=2, max_new_tokens=3)
    depthwise_decode(c, params, prompts, lengths, spec, threshold=0.5)
    from free_jax.decoding import depthwise

    before = depthwise._decode._cache_size()
    depthwise_decode(c, params, prompts, lengths, spec, threshold=0.7)
    assert depthwise._decode._cache_size() == before


def test_bad_inputs_name_the_field():
    with pytest.raises(ValueError, match="DepthwiseSpec.slots=0"):
        DepthwiseSpec(slots=0)
    with pytest.raises(ValueError, match="skipped_kv='zeros'"):
        DepthwiseSpec(skipped_kv="zeros")
    with pytest.raises(ValueError, match="hidden_cosine"):
        DepthwiseSpec(measure="hidden_cosine")
    from free_jax.models.lm_config import LMConfig

    c, params = _model("cycle", 6, 0)
    with pytest.raises(ValueError, match="threshold must be a real scalar"):
        depthwise_decode(c, params, jnp.ones((1, 2), jnp.int32), threshold=float("nan"))
    with pytest.raises(TypeError, match="RecursiveConfig"):
        depthwise_decode(LMConfig(**TINY, num_layers=2), {}, jnp.ones((1, 2), jnp.int32))
