"""Every decoder on the stub model (hand-written logits): exact token arrays worked out by hand.

See `stub_model.py` for the tables. Greedy path: 2 3 4 2 3 EOS; the shallow exit (layer 1) is
unsure at position 2 (margin 0.3) and confidently wrong at position 3 (4 instead of 2), after which
every exit says 5 ("off the path"). A skipped cache write would surface as pad tokens (0).
"""

import numpy as np
import pytest
from stub_model import EOS, StubConfig

from free_jax.decoding import (
    BeamSpec,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    StaticSpec,
    decode,
    make_decoder,
)

N, W = 8, 4
CONFIG = StubConfig()
INPUTS = np.zeros((1, 3), np.int32)  # the encoder-decoder stub ignores its inputs
GREEDY = [2, 3, 4, 2, 3, EOS, 0, 0]


def run(spec, threshold=None, config=CONFIG, inputs=INPUTS, **kw):
    out = decode(config, {}, inputs, spec, max_decode_len=N, threshold=threshold, **kw)
    return np.asarray(out.tokens)[0].tolist(), np.asarray(out.exit_layer)[0].tolist(), out


def test_greedy_and_beam_of_one():
    tokens, exits, out = run(GreedySpec())
    assert tokens == GREEDY and exits == [4] * 6 + [0, 0] and int(out.lengths[0]) == 6
    assert run(BeamSpec(beam_size=1))[0] == GREEDY


@pytest.mark.parametrize(
    "k, want",
    [(1, [2, 3, 5, 5, 5, 5, 5, 5]), (2, [2, 3, 4, 2, 4, 5, 5, 5]), (3, GREEDY)],
)
def test_static_exit(k, want):
    tokens, exits, _ = run(StaticSpec(exit_layer=k))
    assert tokens == want and exits == [k if t else 0 for t in want]


def test_calm_exits_at_the_first_confident_layer_and_copies_state():
    # layer 2 at position 2 reads positions 0 and 1 of layer 2, which only state copying filled
    tokens, exits, _ = run(CalmSpec(min_exit=1), threshold=0.75)
    assert tokens == [2, 3, 4, 4, 5, 5, 5, 5]
    assert exits == [1, 1, 2, 1, 1, 1, 1, 1]
    # from layer 2 only position 2 is confident (0.85) and the path is never left
    assert run(CalmSpec(min_exit=2), threshold=0.75)[:2] == (GREEDY, [4, 4, 2, 4, 4, 4, 0, 0])
    assert run(CalmSpec(), threshold=1.0)[0] == GREEDY  # never exits


def test_free_plain_keeps_a_confident_mistake_and_records_it():
    tokens, exits, out = run(FreeSpec(window=W), threshold=0.75)
    assert tokens == [2, 3, 4, 4, 5, 5, 5, 5]
    assert exits == [1, 1, 4, 1, 1, 1, 1, 1]
    # passes: positions 0-2 (position 2 unsure), then 3-6 (the stack filled the window)
    assert out.pass_width_counts.tolist() == [0, 0, 2]
    valid = np.asarray(out.records.valid)[0].tolist()
    agree = np.asarray(out.records.agree)[0].tolist()
    assert valid == [True] * 7 + [False]
    assert agree[:7] == [True, True, False, False, True, True, True]
    np.testing.assert_allclose(
        np.asarray(out.records.confidence)[0, :4], [0.9, 0.8, 0.3, 0.95], atol=1e-5
    )


def test_free_lossless_and_rollback_reject_the_mistake():
    want_exits = [1, 1, 4, 4, 4, 1, 0, 0]
    tokens, exits, out = run(FreeSpec(window=W, lossless=True), threshold=0.75)
    assert tokens == GREEDY and exits == want_exits and int(out.num_rollbacks[0]) == 1
    tokens, exits, out = run(FreeSpec(window=W, rollback=1.0), threshold=0.75)
    assert tokens == GREEDY and exits == want_exits and int(out.num_rollbacks[0]) == 1
    # a lenient rollback threshold accepts everything: plain FREE's tokens
    assert run(FreeSpec(window=W, rollback=100.0), threshold=0.75)[0] == [2, 3, 4, 4, 5, 5, 5, 5]


def test_free_never_exit_is_greedy():
    tokens, exits, _ = run(FreeSpec(window=W), threshold=1.0)
    assert tokens == GREEDY and exits == [4] * 6 + [0, 0]


PROMPTS = np.array([[0, 5, 5], [0, 2, 3]], np.int32)  # right-padded: lengths 1 and 3
LENGTHS = np.array([1, 3], np.int32)
FROM_PROMPT = [4, 2, 3, EOS, 0, 0, 0, 0]  # the greedy path continued after "2 3"


@pytest.mark.parametrize(
    "spec, threshold, want",
    [
        (GreedySpec(), None, [GREEDY, FROM_PROMPT]),
        (FreeSpec(window=W), 0.75, [[2, 3, 4, 4, 5, 5, 5, 5], [4, 4, 5, 5, 5, 5, 5, 5]]),
        (FreeSpec(window=W, lossless=True), 0.75, [GREEDY, FROM_PROMPT]),
        (CalmSpec(), 0.75, [[2, 3, 4, 4, 5, 5, 5, 5], [4, 4, 5, 5, 5, 5, 5, 5]]),
    ],
)
def test_ragged_prompts_batch_equals_one_by_one(spec, threshold, want):
    config = StubConfig(prompts=True)
    out = decode(config, {}, PROMPTS, spec, max_decode_len=N, threshold=threshold,
                 prompt_lengths=LENGTHS)  # fmt: skip
    assert np.asarray(out.tokens).tolist() == want
    for row in range(2):
        alone = PROMPTS[row : row + 1, : LENGTHS[row]]
        one = decode(config, {}, alone, spec, max_decode_len=N, threshold=threshold,
                     prompt_lengths=LENGTHS[row : row + 1])  # fmt: skip
        assert np.asarray(one.tokens)[0].tolist() == want[row]


def test_prompt_lengths_are_checked():
    config = StubConfig(prompts=True)
    with pytest.raises(ValueError, match=r"prompt_lengths must lie in \[1, 3\]"):
        decode(config, {}, PROMPTS, GreedySpec(), max_decode_len=N, prompt_lengths=[0, 3])
    with pytest.raises(ValueError, match="NaN"):
        decode(config, {}, PROMPTS, FreeSpec(), max_decode_len=N, threshold=float("nan"))


def test_specs_differing_in_traced_values_share_a_compile():
    a = make_decoder(CONFIG, FreeSpec(window=W, rollback=1.0), max_decode_len=N)
    b = make_decoder(CONFIG, FreeSpec(window=W, rollback=100.0), max_decode_len=N)
    assert a.spec == b.spec and a.jitted is b.jitted
    a({}, INPUTS, 0.75).tokens.block_until_ready()
    traced = a.trace_count
    assert np.asarray(b({}, INPUTS, 0.75).tokens)[0].tolist() == [2, 3, 4, 4, 5, 5, 5, 5]
    assert b.trace_count == traced


def test_decoders_import_no_model_family():
    """Decoders see models only through `models.protocol`: no decoding module imports a family."""
    import ast
    import pathlib

    import free_jax.decoding

    families = {"free_jax.models.t5", "free_jax.models.lm", "free_jax.models.config",
                "free_jax.models.lm_config"}  # fmt: skip
    for path in pathlib.Path(free_jax.decoding.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in families, f"{path.name} imports {node.module}"
                names = {alias.name for alias in node.names}
                assert not names & {"T5", "T5Config", "DecoderLM", "LMConfig"}, path.name
