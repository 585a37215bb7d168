"""The decode benchmark's plumbing on a tiny model (what it prints, not how fast anything is)."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from free_jax.benchmarks import decode as bench
from free_jax.benchmarks.decode_bounds import pieces_bound
from free_jax.decoding import cpu_flags
from free_jax.decoding.specs import CalmSpec, FreeSpec, GreedySpec, StaticSpec


@pytest.mark.slow  # ~30 s of compiling five decoders twice; the bound's hand count stays below
def test_records_carry_bounds_and_pass_widths(tmp_path, capsys):
    out = tmp_path / "bench.json"
    bench.main([
        "--preset", "tiny", "--shallow", "1", "--batch_sizes", "1", "2", "--max_decode_len", "8",
        "--source_len", "6", "--window", "4", "--repeats", "1", "--no_hf",
        "--decoders", "greedy", "static", "free", "free_norecords", "free_deferred",
        "--force_exit_rate", "0.5", "--json", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert {(r["decoder"], r["batch_size"]) for r in records} == {
        (d, b)
        for d in ("greedy", "static", "free", "free_norecords", "free_deferred")
        for b in (1, 2)
    }
    for r in records:
        for key in (
            "decoder",
            "batch_size",
            "tokens_per_s",
            "speedup_vs_full",
            "exit_rate",
            "bound",
        ):
            assert key in r
        assert r["spec"]["type"] == type(bench.decoder_specs()[r["decoder"]]).__name__
        if r["decoder"].startswith("free"):
            assert r["spec"]["window"] == 4
            assert r["spec"]["records"] is (r["decoder"] != "free_norecords")
            counts = r["pass_width_counts"]
            assert list(counts) == ["1", "2", "4"]  # pass_widths(4), as JSON keys
            assert sum(counts.values()) > 0 and r["pieces_bound"] > 0
            if r["batch_size"] == 1:  # at batch 1 every pass is the example's own
                assert sum(counts.values()) == r["deep_passes"]
            assert r["batch_passes"] == sum(counts.values()) and r["max_wait"] >= 0
        else:
            assert r["pieces_bound"] is None
    deferred = {r["batch_size"]: r for r in records if r["decoder"] == "free_deferred"}
    for b, r in deferred.items():
        d = r["deferral"]
        assert 1 <= d["min_waiting"] <= b and d["step_costs_ms"]["shallow"] > 0
        assert d["simulated_gain"] >= 1.0  # no deferral is one of the candidates
    free = {r["batch_size"]: r for r in records if r["decoder"] == "free"}
    assert free[2]["tokens"] == deferred[2]["tokens"] and free[2]["mean_wait"] == 0
    assert "deep passes by width" in printed and "exit head on C rows" in printed
    assert "free_deferred batch 2 policy: min_waiting" in printed


def test_pieces_bound_hand_count():
    class Result:  # 8 tokens; 8 shallow steps; two passes, 4 wide
        lengths = np.array([8])
        num_steps = np.array(8)
        pass_width_counts = np.array([0, 0, 2])

    parts = {
        "layer": 1.0,
        "head": 2.0,
        "deep": {1: 3.0, 2: 4.0, 4: 5.0},
        "head_rows": {1: 2.0, 2: 3.0, 4: 4.0},
    }
    # greedy: 8 * (4 layers + head) = 48; FREE: 8 * (1 + 2) + 2 * (5 + 4) = 42, lean: 8 * 3 + 2 * 7
    assert pieces_bound(FreeSpec(), Result, parts, 4, 1) == 48 / 42
    assert pieces_bound(FreeSpec(records=False), Result, parts, 4, 1) == 48 / 38
    assert pieces_bound(GreedySpec(), Result, parts, 4, 1) is None


def test_named_decoders_are_specs():
    specs = bench.decoder_specs(window=4, static_k=2)
    assert tuple(specs) == bench.DECODERS == (
        "greedy", "static", "calm", "free", "free_norecords", "free_lossless", "free_deferred",
        "sample", "beam", "free_exits", "free_exits_lossless", "calm_exits",
    )  # fmt: skip
    assert specs["static"] == StaticSpec(exit_layer=2)
    assert specs["calm"] == CalmSpec() and specs["calm"].min_exit == 1  # as in the suite
    assert specs["free"] == FreeSpec(window=4)
    assert specs["free_norecords"] == FreeSpec(window=4, records=False)
    assert specs["free_lossless"] == FreeSpec(window=4, lossless=True)
    assert specs["free_exits"] == FreeSpec(window=4, exits=(1, 2))
    assert specs["calm_exits"] == CalmSpec(exits=(1, 2))
    assert specs["free_deferred"] == FreeSpec(window=4)  # its policy is planned per batch size
    assert set(bench.EARLY_EXIT) == {
        "calm", "free", "free_norecords", "free_lossless", "free_deferred", *bench.MANY_EXITS
    }  # fmt: skip


@pytest.mark.slow  # multi-exit decoding is tested in tests/decoding/test_multi_exit.py
def test_many_exit_rows_and_their_bound(tmp_path):
    out = tmp_path / "bench.json"
    bench.main([
        "--preset", "tiny", "--batch_sizes", "1", "2", "--max_decode_len", "8", "--source_len",
        "6", "--window", "4", "--repeats", "1", "--no_hf", "--exits", "1", "2", "--decoders",
        "greedy", "free_exits", "free_exits_lossless", "calm_exits", "--force_exit_rate", "0.5",
        "--json", str(out),
    ])  # fmt: skip
    records = {(r["decoder"], r["batch_size"]): r for r in json.loads(out.read_text())}
    for b in (1, 2):
        lossless = records[("free_exits_lossless", b)]
        assert lossless["spec"]["exits"] == [1, 2] and lossless["spec"]["lossless"] is True
        for name in ("free_exits", "calm_exits"):
            r = records[(name, b)]
            assert 0.0 < r["exit_rate"] < 1.0
            # L = 4 over the mean exit layer: 1 if nothing exits, 4 if all leave at layer 1; the
            # heads' cost can only lower it
            assert 1.0 < r["bound"] < 4.0 and r["bound_with_heads"] < r["bound"] + 1e-9
            assert r["pieces_bound"] is None


def test_cpu_decode_flags_are_accepted_by_this_jaxlib():
    # XLA aborts a process whose XLA_FLAGS it does not know; a fresh process shows it starts.
    code = textwrap.dedent("""
        from free_jax.decoding import cpu_flags
        flags = cpu_flags.apply()
        import jax, jax.numpy as jnp
        x = jnp.ones((4, 64))
        print(flags, float(jax.jit(lambda a: (a @ a.T).sum())(x)))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    flags, total = done.stdout.split("\n")[-2].rsplit(" ", 1)
    assert float(total) == 4 * 4 * 64
    # the earlier value of a flag it sets is replaced, not duplicated
    assert flags.split() == list(cpu_flags.DECODE_FLAGS)


def test_cpu_decode_flags_refuse_a_started_backend():
    import jax.numpy as jnp

    jnp.zeros(1).block_until_ready()  # the test process's backend is running
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        cpu_flags.apply()


def test_set_overrides_the_preset_shape():
    args = bench.parse_args(["--preset", "demo-small", "--set", "d_model=192", "num_heads=6"])
    assert args.set == [("d_model", 192), ("num_heads", 6)]
    config = bench.model_config(args.preset, **dict(args.set))
    assert (config.d_model, config.num_heads, config.num_decoder_layers) == (192, 6, 8)
    for bad in (["--set", "d_model"], ["--set", "d_model=wide"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
