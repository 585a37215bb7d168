"""`python -m free_jax.generate`'s decoder flags build the method's spec (`specs.spec_for`)."""

import pytest

from free_jax import generate
from free_jax.decoding.specs import (
    METHODS,
    BeamSpec,
    CalmSpec,
    FreeSpec,
    GreedySpec,
    SampleSpec,
    StaticSpec,
)
from free_jax.models import preset

CONFIG = preset("tiny")  # L=4, S=1


def spec_of(*flags):
    return generate.decoder_spec(generate.parse_args(["--checkpoint=x", *flags, "hello"]), CONFIG)


def test_decoder_choices_are_the_spec_methods_and_full():
    for method in METHODS:
        spec_of(f"--decoder={method}")
    assert spec_of("--decoder=full") == GreedySpec()
    with pytest.raises(SystemExit):
        generate.parse_args(["--checkpoint=x", "--decoder=free_norecords", "hello"])


@pytest.mark.parametrize(
    "flags, spec",
    [
        ([], FreeSpec()),
        (["--decoder=static"], StaticSpec(exit_layer=1)),
        (["--decoder=static", "--exit_layer=3", "--measure=softmax_max"],
         StaticSpec(exit_layer=3, measure="softmax_max")),
        (["--decoder=calm"], CalmSpec()),
        (["--decoder=calm", "--exit_layer=2", "--measure=hidden_cosine", "--position_temp=0.5"],
         CalmSpec(min_exit=2, measure="hidden_cosine", position_temp=0.5)),
        (["--decoder=free", "--exit_layer=2", "--window=4", "--rollback=0.7", "--no_records",
          "--measure=learned", "--position_temp=0.2"],
         FreeSpec(shallow=2, window=4, rollback=0.7, records=False, measure="learned",
                  position_temp=0.2)),
        (["--decoder=free_lossless", "--window=2"], FreeSpec(window=2, lossless=True)),
        (["--decoder=sample", "--top_k=5", "--temperature=0.7"],
         SampleSpec(top_k=5, temperature=0.7)),
        (["--decoder=beam", "--beam_size=2", "--length_penalty=0.6"],
         BeamSpec(beam_size=2, length_penalty=0.6)),
    ],
)  # fmt: skip
def test_flags_build_the_spec(flags, spec):
    assert spec_of(*flags) == spec


@pytest.mark.parametrize(
    "flags",
    [
        ["--decoder=greedy", "--window=4"],
        ["--decoder=static", "--position_temp=0.3"],
        ["--decoder=calm", "--window=4"],
        ["--decoder=full", "--exit_layer=2"],
        ["--decoder=free", "--beam_size=2"],
    ],
)
def test_an_option_the_spec_lacks_is_an_error(flags):
    with pytest.raises(SystemExit, match="takes no --"):
        spec_of(*flags)


def test_rollback_is_free_only():
    with pytest.raises(ValueError, match="rollback"):
        spec_of("--decoder=free_lossless", "--rollback=0.5")
