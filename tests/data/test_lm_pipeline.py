"""Causal-LM batches: the worked rows of lm_pipeline's docstring, loss weights per format,
packing, truncation counts, resumable state and validation prompts."""

import json

import numpy as np
import pytest

from free_jax.data import lm_pipeline, tasks

TASK = tasks.Task(name="ints", dataset="memory", input_field="input", target_field="target")
EOS, BOS = 1, 7


def _train(source, tok, **kwargs):
    defaults = dict(
        batch_size=1, max_prompt_length=4, max_target_length=4, shard_index=0, shard_count=1,
        bos_id=BOS, num_epochs=1,
    )  # fmt: skip
    return lm_pipeline.lm_train_batches(source, TASK, tok, **{**defaults, **kwargs})


def _row(batch, row=0):
    return {k: v[row].tolist() for k, v in batch.items()}


@pytest.mark.parametrize("format", ["prompt_target", "text"])
def test_one_example_shift_and_weights(int_tokenizer, format):
    # "a b" -> "x y" as 10 11 -> 20 21: sequence [BOS 10 11 20 21 EOS], row length 4 + 4.
    batch = next(_train([{"input": "10 11", "target": "20 21"}], int_tokenizer, format=format))
    assert set(batch) == {"decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"}
    row = _row(batch)
    assert row["decoder_input_tokens"] == [BOS, 10, 11, 20, 21, 0, 0, 0]
    assert row["decoder_target_tokens"] == [10, 11, 20, 21, EOS, 0, 0, 0]
    if format == "prompt_target":  # only the target tokens and the EOS are predicted
        assert row["decoder_loss_weights"] == [0, 0, 1, 1, 1, 0, 0, 0]
    else:  # every real token
        assert row["decoder_loss_weights"] == [1, 1, 1, 1, 1, 0, 0, 0]
    assert batch["decoder_loss_weights"].dtype == np.float32


def test_without_bos_the_first_prompt_token_is_only_an_input(int_tokenizer):
    batch = next(_train([{"input": "10 11", "target": "20"}], int_tokenizer, bos_id=None))
    row = _row(batch)
    assert row["decoder_input_tokens"][:3] == [10, 11, 20]
    assert row["decoder_target_tokens"][:3] == [11, 20, EOS]
    assert row["decoder_loss_weights"][:4] == [0, 1, 1, 0]


def test_packing_matches_the_worked_example(int_tokenizer):
    # The module docstring's row: "a b" -> "x y" and "c" -> "z" in one row of length 8.
    source = [{"input": "10 11", "target": "20 21"}, {"input": "12", "target": "22"}]
    batch = next(_train(source, int_tokenizer, pack=True))
    row = _row(batch)
    first = {
        "decoder_input_tokens": [BOS, 10, 11, 20, 21],
        "decoder_target_tokens": [10, 11, 20, 21, EOS],
        "decoder_loss_weights": [0, 0, 1, 1, 1],
    }
    second = {
        "decoder_input_tokens": [BOS, 12, 22],
        "decoder_target_tokens": [12, 22, EOS],
        "decoder_loss_weights": [0, 1, 1],
    }
    if row["decoder_input_tokens"][1] == 10:  # the docstring's order
        parts, lengths = (first, second), (5, 3)
    else:  # shuffled the other way round
        parts, lengths = (second, first), (3, 5)
    for key in first:
        assert row[key] == parts[0][key] + parts[1][key], key
    assert row["decoder_segment_ids"] == [1] * lengths[0] + [2] * lengths[1]
    assert row["decoder_positions"] == list(range(lengths[0])) + list(range(lengths[1]))


def _source(lengths):
    """Example i: prompt [100+i, 3, ...] and target [500+i, 4, ...] of the given lengths."""
    return [
        {
            "input": " ".join([str(100 + i)] + ["3"] * (n - 1)),
            "target": " ".join([str(500 + i)] + ["4"] * (m - 1)),
        }
        for i, (n, m) in enumerate(lengths)
    ]


@pytest.mark.parametrize("format", ["prompt_target", "text"])
def test_packing_places_every_example_once_with_its_weights(int_tokenizer, format):
    rng = np.random.default_rng(0)
    source = _source([(int(rng.integers(1, 6)), int(rng.integers(1, 5))) for _ in range(30)])
    iterator = _train(
        source, int_tokenizer, batch_size=3, max_prompt_length=8, max_target_length=6,
        pack=True, format=format,
    )  # fmt: skip
    seen = []
    for batch in iterator:
        for row in range(3):
            ids = batch["decoder_segment_ids"][row]
            assert np.all(np.diff(ids[ids > 0]) >= 0), "segments are contiguous"
            for s in np.unique(ids[ids > 0]):
                at = ids == s
                inputs = batch["decoder_input_tokens"][row][at].tolist()
                targets = batch["decoder_target_tokens"][row][at].tolist()
                weights = batch["decoder_loss_weights"][row][at].tolist()
                np.testing.assert_array_equal(batch["decoder_positions"][row][at], range(at.sum()))
                i = inputs[1] - 100
                prompt = int_tokenizer.encode(source[i]["input"])
                target = int_tokenizer.encode(source[i]["target"])
                sequence = [BOS] + prompt + target + [EOS]
                assert inputs == sequence[:-1] and targets == sequence[1:]
                n_prompt = len(prompt)  # predictions of prompt tokens after the BOS
                want = [1.0] * len(targets)
                if format == "prompt_target":
                    want = [0.0] * n_prompt + [1.0] * (len(target) + 1)
                assert weights == want
                seen.append(i)
            # Nothing outside a segment is trained on.
            assert not batch["decoder_loss_weights"][row][ids == 0].any()
    assert sorted(seen) == list(range(30))
    assert iterator.counters["num_examples"] == 30


def test_truncation_keeps_bos_and_eos_and_is_counted(int_tokenizer):
    # Prompt room 4 ([BOS] + 3 tokens), target room 3 (2 tokens + EOS).
    source = [{"input": "10 11 12 13 14", "target": "20 21 22"}]
    iterator = _train(source, int_tokenizer, max_prompt_length=4, max_target_length=3)
    row = _row(next(iterator))
    assert row["decoder_input_tokens"] == [BOS, 10, 11, 12, 20, 21, 0]
    assert row["decoder_target_tokens"] == [10, 11, 12, 20, 21, EOS, 0]
    assert row["decoder_loss_weights"] == [0, 0, 0, 1, 1, 1, 0]
    assert iterator.counters["num_truncated_inputs"] == 1
    assert iterator.counters["num_truncated_targets"] == 1


def test_unknown_format_is_rejected(int_tokenizer):
    with pytest.raises(ValueError, match="prompt_target"):
        _train(_source([(1, 1)]), int_tokenizer, format="seq2seq")


@pytest.mark.parametrize("pack", [False, True])
def test_resumed_iterator_continues_with_the_next_batch(int_tokenizer, pack):
    rng = np.random.default_rng(1)
    source = _source([(int(rng.integers(1, 5)), int(rng.integers(1, 4))) for _ in range(20)])
    kwargs = dict(batch_size=2, max_prompt_length=6, max_target_length=4, pack=pack, seed=3,
                  num_epochs=None)  # fmt: skip
    uninterrupted = _train(source, int_tokenizer, **kwargs)
    for _ in range(13):  # past an epoch boundary
        next(uninterrupted)
    state = json.loads(json.dumps(uninterrupted.get_state()))
    expected = [next(uninterrupted) for _ in range(3)]
    resumed = _train(source, int_tokenizer, **kwargs)
    resumed.set_state(state)
    for batch in expected:
        got = next(resumed)
        assert got.keys() == batch.keys()
        for key in batch:
            np.testing.assert_array_equal(got[key], batch[key], err_msg=key)
    assert resumed.counters == uninterrupted.counters


def test_eval_batches_carry_the_prompts_to_continue(int_tokenizer):
    source = _source([(2, 1), (4, 2), (1, 3)])
    batches = list(
        lm_pipeline.lm_eval_batches(
            source, TASK, int_tokenizer, batch_size=2, max_prompt_length=4, max_target_length=4,
            bos_id=BOS, shard_index=0, shard_count=1,
        )
    )  # fmt: skip
    assert [b["num_real"] for b in batches] == [2, 1]
    first = batches[0]
    assert first["prompt_tokens"].tolist() == [[BOS, 100, 3, 0], [BOS, 101, 3, 3]]
    assert first["prompt_lengths"].tolist() == [3, 4]  # the second prompt was cut to fit
    assert first["decoder_target_tokens"][0].tolist()[:4] == [100, 3, 500, EOS]
    last = batches[1]
    assert last["prompt_lengths"].tolist() == [2, 0] and not last["decoder_loss_weights"][1].any()
    assert [r for b in batches for r in b["references"]] == [[s["target"]] for s in source]
