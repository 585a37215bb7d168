"""Periodic validation during training: the loss of every exit, and the task metric of greedy decodes.

Greedy decoding here is a small cached loop over the model's piecewise API (encode once, then one
token per step through all L layers), enough for a few hundred examples. The evaluation package
owns the full metric suite and the early-exit decoders; the three metrics here follow the usual
definitions so training curves are comparable with its numbers:

* "bleu": sacrebleu corpus BLEU (13a tokenisation) against the first reference.
* "rouge": rouge-score F-measures x 100 of rouge1, rouge2 and rougeLsum, with stemming.
* "squad": exact match and token F1 x 100 after SQuAD's answer normalisation, best over references.
"""

from __future__ import annotations

import collections
import functools
import re
import string
from collections.abc import Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models import T5, T5Config, init_cache
from free_jax.training.losses import exit_losses

# ---------------------------------------------------------------------------------------------
# Greedy decoding
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config", "max_decode_len"))
def greedy_decode(config: T5Config, params, encoder_tokens_BS: jax.Array, max_decode_len: int):
    """Greedy tokens [B, max_decode_len] from the deep exit; positions after EOS hold pad (0).

    For example `tokenizer.decode(greedy_decode(config, params, enc_BS, max_decode_len=32)[0])`
    is the first example's text, up to its EOS.
    """
    model, v = T5(config), {"params": params}
    b = encoder_tokens_BS.shape[0]
    encoded_BSD = model.apply(v, encoder_tokens_BS, method=T5.encode)
    cross = model.apply(v, encoded_BSD, method=T5.precompute_cross)
    encoder_mask_BS = encoder_tokens_BS != config.pad_token_id

    def body(t, carry):
        cache, prev_B, tokens_BT, done_B = carry
        hidden_B1D = model.apply(v, prev_B[:, None], method=T5.embed_decoder)
        hidden_B1D, cache = model.apply(
            v, hidden_B1D, start=0, end=config.num_decoder_layers, cache=cache, cross=cross,
            encoder_mask_BS=encoder_mask_BS, offset_B=jnp.full((b,), t, jnp.int32),
            method=T5.decode_layers,
        )  # fmt: skip
        logits_BV = model.apply(v, hidden_B1D, method=T5.exit_logits)[:, 0]
        next_B = jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
        next_B = jnp.where(done_B, config.pad_token_id, next_B)
        tokens_BT = tokens_BT.at[:, t].set(next_B)
        return cache, next_B, tokens_BT, done_B | (next_B == config.eos_token_id)

    carry = (
        init_cache(config, b, max_decode_len),
        jnp.full((b,), config.decoder_start_token_id, jnp.int32),
        jnp.zeros((b, max_decode_len), jnp.int32),
        jnp.zeros((b,), bool),
    )
    return jax.lax.fori_loop(0, max_decode_len, body, carry)[2]


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    import sacrebleu

    return {"bleu": sacrebleu.corpus_bleu(list(predictions), [[r[0] for r in references]]).score}


def rouge(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    from rouge_score import rouge_scorer

    kinds = ("rouge1", "rouge2", "rougeLsum")
    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    totals = collections.Counter()
    for prediction, refs in zip(predictions, references):
        # rougeLsum splits summaries into sentences at newlines.
        scores = scorer.score(refs[0].replace(". ", ".\n"), prediction.replace(". ", ".\n"))
        for kind in kinds:
            totals[kind] += scores[kind].fmeasure
    n = max(len(predictions), 1)
    return {kind: 100.0 * totals[kind] / n for kind in kinds}


def _normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def _token_f1(prediction: str, reference: str) -> float:
    pred, ref = _normalize_answer(prediction).split(), _normalize_answer(reference).split()
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if not pred or not ref:
        return float(pred == ref)
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def squad(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"exact_match", "f1"}, each x 100, best over an example's references.

    >>> squad(["The Eiffel tower"], [["Eiffel Tower", "tower"]])
    {'exact_match': 100.0, 'f1': 100.0}
    """
    em = f1 = 0.0
    for prediction, refs in zip(predictions, references):
        em += max(float(_normalize_answer(prediction) == _normalize_answer(r)) for r in refs)
        f1 += max(_token_f1(prediction, r) for r in refs)
    n = max(len(predictions), 1)
    return {"exact_match": 100.0 * em / n, "f1": 100.0 * f1 / n}


METRIC_FNS = {"bleu": bleu, "rouge": rouge, "squad": squad}
# The number each metric family is ranked by (best checkpoint, logs).
PRIMARY = {"bleu": "bleu", "rouge": "rougeLsum", "squad": "f1"}


def task_metric(name: str, predictions, references) -> dict[str, float]:
    if name not in METRIC_FNS:
        raise ValueError(f"unknown metric {name!r}; expected one of {sorted(METRIC_FNS)}")
    return METRIC_FNS[name](predictions, references)


# ---------------------------------------------------------------------------------------------
# One validation pass
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("config",))
def _exit_losses(config, params, batch):
    return exit_losses(config, params, batch)


def validation_losses(
    config: T5Config, params, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Token-weighted CE and accuracy of every exit (`ce_layer{l}`, `acc_layer{l}`) over batches."""
    totals = collections.Counter()
    for batch in batches:
        sums = jax.device_get(_exit_losses(config, params, dict(batch)))
        for key, value in sums.items():
            totals[key] += float(value)
    weight = max(totals.pop("weight", 0.0), 1e-8)
    return {key: value / weight for key, value in totals.items()}


def decode_and_score(
    config: T5Config,
    params,
    encoder_tokens: Sequence[np.ndarray],
    references: Sequence[Sequence[str]],
    detokenize,
    metric: str,
    *,
    batch_size: int = 64,
    max_decode_len: int = 64,
    input_length: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Greedy-decodes `encoder_tokens` (one 1-D array per example) and scores the texts.

    Uses `free_jax.decoding.decode` when that package provides it, else `greedy_decode` above.
    Every batch is padded to [batch_size, input_length] (default: the longest input), so one
    compiled decoder serves the whole pass.
    """
    decode = _decoder()
    predictions = []
    length = input_length or max(len(x) for x in encoder_tokens)
    for start in range(0, len(encoder_tokens), batch_size):
        chunk = list(encoder_tokens[start : start + batch_size])
        enc_BS = np.zeros((batch_size, length), np.int32)
        for i, tokens in enumerate(chunk):
            enc_BS[i, : len(tokens)] = tokens
        out_BT = np.asarray(decode(config, params, jnp.asarray(enc_BS), max_decode_len))
        predictions.extend(detokenize(out_BT[i]) for i in range(len(chunk)))
    return task_metric(metric, predictions, references), predictions


def _decoder():
    try:
        from free_jax.decoding import decode as library_decode
    except ImportError:
        return greedy_decode

    def decode(config, params, enc_BS, max_decode_len):
        out = library_decode(config, params, enc_BS, method="greedy", max_decode_len=max_decode_len)
        return getattr(out, "tokens", out)

    return decode
