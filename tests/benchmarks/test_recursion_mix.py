"""The recursion_mix benchmark: FLOP-matched training steps, and its records on a tiny run (speed is
not asserted)."""

from __future__ import annotations

import json

import pytest

from free_jax.benchmarks import recursion_mix as bench


def test_mor_models_train_more_steps_for_the_same_flops():
    args = bench.parse_args([])
    configs = bench._configs(args)
    base = bench.flops_per_token(configs["vanilla"])
    for n in args.loops:
        mor = configs[f"mor_{n}"]
        # Fewer layer applications per token (expert-choice capacities), same head.
        assert bench.flops_per_token(mor) < base
        assert mor.num_layers == configs["vanilla"].num_layers


def test_loops_that_do_not_divide_the_middle_are_refused(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--layers", "8", "--loops", "4"])
    assert "divide --layers - 2 = 6" in capsys.readouterr().err


@pytest.mark.slow  # trains three tiny models and compiles seven decoders (~60 s)
def test_records_compare_every_engine_on_the_same_prompts(tmp_path, tfds_dir, capsys):
    out = tmp_path / "mix.json"
    bench.main([
        "--steps", "4", "--slots", "2", "--requests", "3", "--new_tokens", "3", "--repeats", "1",
        "--d_model", "32", "--d_ff", "64", "--vocab", "128", "--eval_examples", "8",
        "--work_dir", str(tmp_path / "work"), "--data_dir", str(tfds_dir), "--json", str(out),
    ])  # fmt: skip
    records = json.loads(out.read_text())
    engines = {r["engine"] for r in records}
    assert engines == {"vanilla"} | {
        f"mor_{n}_{way}" for n in (2, 3) for way in ("full_depth", "synchronized", "depthwise")
    }
    by = {r["engine"]: r for r in records}
    for n in (2, 3):
        # The three ways of decoding one model emit the same tokens (same BLEU and count).
        ways = [by[f"mor_{n}_{w}"] for w in ("full_depth", "synchronized", "depthwise")]
        assert len({(r["tokens"], r["bleu"]) for r in ways}) == 1
        assert ways[0]["params"] < by["vanilla"]["params"]
        assert ways[0]["train_steps"] > by["vanilla"]["train_steps"]
        assert 1.0 <= by[f"mor_{n}_depthwise"]["recursions_per_token"] <= n
    assert "vs vanilla" in capsys.readouterr().out
