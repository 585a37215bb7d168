"""Every decoder option is a gin binding that reaches the decoder the evaluation suite runs.

The suite runs on a random tiny model (L=4, S=1) through `free_jax.evaluate` itself, configured by
gin_configs/runs/evaluate.gin plus bindings; a spy around `make_decoder` records each decoder built
and what every call passed it.
"""

import dataclasses
import json
from pathlib import Path

import gin
import jax
import numpy as np
import pytest

from free_jax import calibrate as calibrate_entry
from free_jax import evaluate as evaluate_entry
from free_jax.decoding import init_confidence_head
from free_jax.decoding.specs import CalmSpec, FreeSpec, GreedySpec, StaticSpec
from free_jax.evaluation import DecoderChoice, SuiteSpec, runner
from free_jax.evaluation.runner import EvalBatch
from free_jax.loading import load_confidence_head, save_confidence_head
from free_jax.models import init_params, preset

GIN_DIR = Path(__file__).resolve().parents[2] / "gin_configs"
TINY = preset("tiny")
assert (TINY.num_decoder_layers, TINY.shallow_layer) == (4, 1)


class _Tokenizer:
    def decode(self, ids):
        return " ".join(str(int(i)) for i in ids)


class _Spy:
    """A decoder that records each call's threshold and options before running it."""

    def __init__(self, decoder):
        self.decoder, self.calls = decoder, []

    def __call__(self, params, inputs_BS, threshold=None, **options):
        self.calls.append((threshold, options))
        return self.decoder(params, inputs_BS, threshold, **options)


@pytest.fixture(autouse=True)
def clean_gin():
    gin.clear_config()
    yield
    gin.clear_config()


@pytest.fixture
def run_evaluate(monkeypatch, tmp_path):
    """Parses evaluate.gin with `bindings`, runs `evaluate()`; returns (spies, records)."""
    params = init_params(TINY, jax.random.key(0))
    enc_BS = np.random.default_rng(0).integers(2, TINY.vocab_size, (2, 6)).astype(np.int32)
    batches = [EvalBatch(enc_BS, 2, ["1 2 3", "4 5"])]
    monkeypatch.setattr(
        evaluate_entry, "load_model_and_tokenizer", lambda *a, **k: (TINY, params, _Tokenizer())
    )
    monkeypatch.setattr(evaluate_entry, "split_batches", lambda *a, **k: batches)
    spies = []
    real = runner.make_decoder

    def spy(config, spec, **kw):
        spies.append(_Spy(real(config, spec, **kw)))
        return spies[-1]

    monkeypatch.setattr(runner, "make_decoder", spy)

    def run(bindings):
        out_dir = tmp_path / "eval"
        evaluate_entry.parse_gin(
            [str(GIN_DIR / "runs/evaluate.gin")],
            [
                "CHECKPOINT = '/nowhere'", "TASK = 'system_translations'",
                f"OUT_DIR = '{out_dir}'", "EvalSettings.max_decode_len = 4",
                "EvalSettings.adaptive_estimator = 'moments'", "SuiteSpec.batch_sizes = (2,)",
                "SuiteSpec.sweep_thresholds = (0.5,)", *bindings,
            ],
        )  # fmt: skip
        evaluate_entry.evaluate(progress=False)
        records = json.loads((out_dir / "results.json").read_text())
        return spies, records, (out_dir / "results.md").read_text()

    return run


def _by_spec(spies):
    out = {}
    for s in spies:
        out.setdefault(s.decoder.method_spec, []).extend(s.calls)
    return out


def test_every_spec_field_reaches_the_suites_decoders(run_evaluate):
    spies, records, table = run_evaluate([
        "FreeSpec.window = 2", "FreeSpec.shallow = 2", "FreeSpec.measure = 'softmax_max'",
        "FreeSpec.rollback = 0.5", "FreeSpec.position_temp = 0.3",
        "CalmSpec.min_exit = 2", "CalmSpec.measure = 'hidden_cosine'",
        "CalmSpec.position_temp = 0.2",
        "SuiteSpec.static = @StaticSpec()", "StaticSpec.exit_layer = 3",
        "SuiteSpec.free_threshold = 0.6", "SuiteSpec.calm_threshold = 0.7",
    ])  # fmt: skip
    # evaluate.gin: timed FREE rows keep no records; the adaptive row keeps them (it refits)
    free = FreeSpec(
        shallow=2, window=2, rollback=0.5, measure="softmax_max", position_temp=0.3, records=False
    )
    adaptive = dataclasses.replace(free, records=True)
    calm = CalmSpec(min_exit=2, measure="hidden_cosine", position_temp=0.2)
    lossless = dataclasses.replace(free, lossless=True, rollback=None)
    calls = _by_spec(spies)
    assert set(calls) == {GreedySpec(), StaticSpec(exit_layer=3), calm, free, adaptive, lossless}
    assert {t for t, _ in calls[calm]} == {0.7, 0.5}  # the main row, then the sweep
    assert {t for t, _ in calls[free]} == {0.6, 0.5}
    assert len(calls[adaptive]) >= 1
    assert {t for t, _ in calls[lossless]} == {0.6}
    # traced values (rollback, position_temp) come from the spec each call defaults to
    for spy in spies:
        assert spy.decoder.options(2, 0.5).position_temp == getattr(
            spy.decoder.method_spec, "position_temp", 0.0
        )
    rows = {r["decoder"]: r for r in records}
    assert set(rows) >= {"static (k=3)", "calm (thr=0.7)", "free (thr=0.6)", "free (adaptive)"}
    assert rows["free (thr=0.6)"]["spec"] == {
        "type": "FreeSpec", "shallow": 2, "window": 2, "lossless": False, "rollback": 0.5,
        "records": False, "measure": "softmax_max", "position_temp": 0.3, "exits": None,
        "min_waiting": 1, "max_wait": 0,
    }  # fmt: skip
    assert rows["free (adaptive)"]["spec"]["records"] is True
    assert rows["free lossless (thr=0.6)"]["method"] == "free_lossless"
    assert rows["calm (thr=0.7)"]["spec"]["min_exit"] == 2
    assert "- calm (thr=0.7): `CalmSpec(min_exit=2, measure='hidden_cosine'" in table


def test_the_sweep_runs_at_every_sweep_batch_size(run_evaluate):
    _, records, _ = run_evaluate([
        "SuiteSpec.batch_sizes = (2, 1)", "SuiteSpec.sweep_batch_sizes = (2, 1)",
        "SuiteSpec.include_adaptive = False", "SuiteSpec.include_lossless = False",
    ])  # fmt: skip
    sweeps = {(r["method"], r["batch_size"]) for r in records if r["kind"] == "sweep"}
    assert sweeps == {(m, b) for m in ("free", "calm") for b in (2, 1)}
    with pytest.raises(ValueError, match=r"sweep_batch_sizes=\(4,\) names batch sizes \[4\]"):
        SuiteSpec(batch_sizes=(8, 1), sweep_batch_sizes=(4,))


def test_lossless_records_and_the_learned_head_reach_the_decoder(run_evaluate, tmp_path):
    head = init_confidence_head(TINY.d_model, jax.random.key(1))
    path = save_confidence_head(tmp_path / "head.msgpack", head)
    spies, records, _ = run_evaluate([
        "FreeSpec.lossless = True", "FreeSpec.records = False", "FreeSpec.measure = 'learned'",
        "SuiteSpec.include_adaptive = False", f"CONFIDENCE_HEAD = '{path}'",
    ])  # fmt: skip
    free = FreeSpec(lossless=True, records=False, measure="learned")
    calls = _by_spec(spies)
    assert free in calls and calls[free]
    for _, options in calls[free]:
        got = options["confidence_params"]
        jax.tree.map(np.testing.assert_array_equal, got, jax.device_get(head))
    for spec, spec_calls in calls.items():
        if spec != free:  # the other specs measure with the softmax margin: no head passed
            assert all("confidence_params" not in options for _, options in spec_calls)
    rows = {r["decoder"]: r for r in records}
    assert rows["free (thr=0.9)"]["method"] == "free_lossless"
    assert rows["free (thr=0.9)"]["same_outputs_as_full"] == 1.0  # lossless, learned head or not


def test_learned_measure_without_a_head_names_the_binding(run_evaluate):
    with pytest.raises(ValueError, match="evaluate.confidence_head"):
        run_evaluate(["CalmSpec.measure = 'learned'"])


def test_calibrate_binds_its_free_spec_and_head(monkeypatch, tmp_path):
    head_path = save_confidence_head(
        tmp_path / "head.msgpack", init_confidence_head(TINY.d_model, jax.random.key(1))
    )
    monkeypatch.setattr(
        calibrate_entry, "load_model_and_tokenizer", lambda *a, **k: (TINY, None, _Tokenizer())
    )
    monkeypatch.setattr(calibrate_entry, "split_batches", lambda *a, **k: [])
    captured = {}

    def collect(config, params, batches, settings, spec, *, confidence_params, progress):
        captured.update(spec=spec, head=confidence_params, settings=settings)
        raise StopIteration

    monkeypatch.setattr(calibrate_entry, "collect_records", collect)
    calibrate_entry.parse_gin(
        [str(GIN_DIR / "runs/calibrate.gin")],
        [
            "CHECKPOINT = '/nowhere'", "TASK = 'system_translations'", "FreeSpec.window = 4",
            "FreeSpec.shallow = 2", "FreeSpec.measure = 'learned'",
            f"CONFIDENCE_HEAD = '{head_path}'",
        ],
    )  # fmt: skip
    with pytest.raises(StopIteration):
        calibrate_entry.calibrate(progress=False)
    assert captured["spec"] == FreeSpec(shallow=2, window=4, measure="learned")
    assert set(captured["head"]) == {"hidden", "out"}


def test_calibration_needs_free_records():
    with pytest.raises(ValueError, match="keeps its agreement records"):
        calibrate_entry.collect_records(TINY, None, [], None, FreeSpec(records=False))


def test_suite_and_choice_reject_what_cannot_run():
    with pytest.raises(TypeError, match="SuiteSpec.calm must be a CalmSpec"):
        SuiteSpec(calm=FreeSpec())
    with pytest.raises(ValueError, match="needs a threshold"):
        DecoderChoice("free", FreeSpec())
    with pytest.raises(ValueError, match="records=True"):
        DecoderChoice("calm", CalmSpec(), adaptive=True)
    assert DecoderChoice("x", FreeSpec(lossless=True), 0.5).method == "free_lossless"


def test_confidence_head_file_round_trip_and_width_check(tmp_path):
    head = init_confidence_head(TINY.d_model, jax.random.key(2))
    path = save_confidence_head(tmp_path / "h.msgpack", head)
    jax.tree.map(
        np.testing.assert_array_equal, load_confidence_head(path, TINY), jax.device_get(head)
    )
    with pytest.raises(ValueError, match="d_model"):
        load_confidence_head(path, TINY.replace(d_model=TINY.d_model * 2))
    (tmp_path / "bad").write_bytes(b"not msgpack")
    with pytest.raises(ValueError, match="not a ConfidenceHead"):
        load_confidence_head(tmp_path / "bad")
