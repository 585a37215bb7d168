"""The depth-wise batching benchmark's records (tiny model, one round; speed is not asserted)."""

from __future__ import annotations

import json

import pytest

from free_jax.benchmarks import depthwise as bench


@pytest.mark.slow  # ~16 s of compiling five engines; the engine itself is tested in tests/decoding
def test_records_compare_every_engine_on_the_same_requests(tmp_path, capsys):
    out = tmp_path / "depthwise.json"
    bench.main([
        "--slots", "2", "--requests", "5", "--prompt_len", "3", "--new_tokens", "4",
        "--d_model", "32", "--d_ff", "64", "--vocab", "64", "--heads", "2", "--repeats", "1",
        "--json", str(out),
    ])  # fmt: skip
    printed = capsys.readouterr().out
    records = json.loads(out.read_text())
    assert {(r["engine"], r["slots"]) for r in records} == {(e, 2) for e in bench.ENGINES}
    for r in records:
        for key in ("engine", "slots", "tokens_per_s", "speedup_vs_greedy", "exit_rate", "bound"):
            assert key in r
        assert r["block_calls_per_token"] > 0
        assert r["tokens_per_s"] > 0 and r["bound"] >= 1.0
    by = {(r["engine"], r["slots"]): r for r in records}
    for s in (2,):
        sync, dw = by[("synchronized", s)], by[("depthwise", s)]
        assert sync["tokens"] == dw["tokens"] and sync["exit_rate"] == dw["exit_rate"]
        assert dw["ticks"] <= sync["ticks"] and dw["busy"] == sync["busy"]
        # Per token, a tick is one call of each of the K = L / B blocks over all slots.
        assert dw["block_calls_per_token"] == dw["ticks"] * 2 / dw["tokens"]
        assert abs(sum(dw["exit_rate"]) - 1.0) < 1e-6
        assert by[("engine_never", s)]["exit_rate"][-1] == 1.0
        assert f"slots {s}: depthwise / synchronized" in printed
