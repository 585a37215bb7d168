"""`python -m free_jax.benchmarks.device_check`, reduced as it runs on a CPU."""

import json

import pytest

from free_jax.benchmarks import device_check


@pytest.mark.slow  # a benchmark run (the decode and train pieces are tested apart)
def test_reduced_device_check_writes_both_tables(tmp_path, capsys):
    result = device_check.main(["--out", str(tmp_path), "--reduced"])
    assert result["reduced"] is True
    saved = json.loads((tmp_path / "device_check.json").read_text())
    rows = {(r["decoder"], r["batch_size"]) for r in saved["decode"]}
    assert rows == {(d, b) for d in device_check.DECODERS for b in (1, 2)}
    by = {(r["decoder"], r["batch_size"]): r for r in saved["decode"]}
    assert by[("free_deferred", 2)]["tokens"] == by[("free", 2)]["tokens"]
    assert "deferral" in by[("free_deferred", 2)]
    assert saved["train"][0]["model"] == "tiny" and saved["train"][0]["tokens_per_s"] > 0
    md = (tmp_path / "device_check.md").read_text()
    assert "(reduced)" in md and "training step" in md and "free_deferred" in md
    assert "free_deferred" in capsys.readouterr().out
