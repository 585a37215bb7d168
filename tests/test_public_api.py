"""`free_jax`'s curated public API: every advertised name resolves, lazily."""

import subprocess
import sys

import free_jax


def test_every_public_name_resolves():
    for name in free_jax.__all__:
        assert getattr(free_jax, name) is not None, name
    assert free_jax.load_hf.__module__ == "free_jax.checkpoints.hf"
    assert free_jax.FreeSpec().window == 8
    assert free_jax.lm_preset("pythia-70m").num_decoder_layers == 6


def test_import_is_cheap_and_unknown_names_fail():
    code = (
        "import sys, free_jax; assert 'numpyro' not in sys.modules and 'jax' not in sys.modules; "
        "free_jax.decode; assert 'jax' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    try:
        free_jax.no_such_thing  # noqa: B018
    except AttributeError as e:
        assert "no_such_thing" in str(e)
    else:
        raise AssertionError("expected AttributeError")
