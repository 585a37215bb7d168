"""Periodic validation during training: the loss of every exit, and the task metric of greedy decodes.

Decoding is the library's (`free_jax.decoding.decode` with `GreedySpec()`: the deep exit, cached)
and scoring is evaluation's (`free_jax.evaluation.metrics.score`), so the numbers logged while
training are the numbers `free_jax.evaluate` reports, under the same names: "bleu"; "rouge1",
"rouge2", "rougeL", "rougeLsum"; "em", "f1"; plus "score" (the task's headline number) and
"loop_rate" (the share of outputs stuck in a repetition loop).

    losses = validation_losses(config, params, batches)          # ce_layer{l}, acc_layer{l}
    heads = exit_head_validation(config, loss_config, params, heads_params, batches)
                                                        # kl_head{l}, agree_head{l}, loss
    scores, texts = decode_and_score(config, params, inputs, references, tokenizer.decode,
                                     "bleu", prompt_lengths=lengths)   # lengths: decoder-only
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import numpy as np

from free_jax.decoding import GreedySpec, decode
from free_jax.evaluation import metrics
from free_jax.training.forward import ModelConfig
from free_jax.training.losses import LossConfig, exit_head_sums, exit_losses


@functools.partial(jax.jit, static_argnames=("config",))
def _exit_losses(config, params, batch):
    return exit_losses(config, params, batch)


def validation_losses(
    config: ModelConfig, params, batches: Iterable[Mapping[str, np.ndarray]]
) -> dict[str, float]:
    """Token-weighted CE and accuracy of every exit (`ce_layer{l}`, `acc_layer{l}`) over batches.

    Each batch holds the training keys of the model's family (other keys are ignored).
    """
    totals = collections.Counter()
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k.startswith(("encoder_", "decoder_"))}
        sums = jax.device_get(_exit_losses(config, params, arrays))
        for key, value in sums.items():
            totals[key] += float(value)
    weight = max(totals.pop("weight", 0.0), 1e-8)
    return {key: value / weight for key, value in totals.items()}


@functools.partial(jax.jit, static_argnames=("config", "loss_config"))
def _exit_head_sums(config, loss_config, params, heads, batch):
    return exit_head_sums(config, loss_config, params, heads, batch)


def exit_head_validation(
    config: ModelConfig,
    loss_config: LossConfig,
    params,
    heads,
    batches: Iterable[Mapping[str, np.ndarray]],
) -> dict[str, float]:
    """Token-weighted KL to the final layer (`kl_head{l}`, at the loss's temperature and top-k)
    and argmax agreement with it (`agree_head{l}`) of every exit head over batches; "loss" is the
    mean KL over heads, the training loss's validation twin."""
    totals = collections.Counter()
    for batch in batches:
        arrays = {k: v for k, v in batch.items() if k.startswith(("encoder_", "decoder_"))}
        sums = jax.device_get(_exit_head_sums(config, loss_config, params, heads, arrays))
        for key, value in sums.items():
            totals[key] += float(value)
    weight = max(totals.pop("weight", 0.0), 1e-8)
    out = {key: value / weight for key, value in totals.items()}
    kls = [v for k, v in out.items() if k.startswith("kl_head")]
    out["loss"] = float(np.mean(kls))
    return out


def decode_and_score(
    config: ModelConfig,
    params,
    inputs: Sequence[np.ndarray],
    references: Sequence[Sequence[str]],
    detokenize: Callable[[np.ndarray], str],
    metric: str,
    *,
    prompt_lengths: Sequence[int] | None = None,
    batch_size: int = 64,
    max_decode_len: int = 64,
    input_length: int | None = None,
) -> tuple[dict[str, float], list[str]]:
    """Greedy-decodes every input and scores the texts against their references.

    Args:
      inputs: one 1-D token array per example: T5 encoder tokens, or a decoder-only model's prompt
        (with its BOS); only the first `prompt_lengths[i]` tokens of a prompt are read.
      references: every acceptable target per example (metrics other than SQuAD's read the first).
      detokenize: ids -> text, stopping at EOS (`Tokenizer.decode`).
      metric: "bleu", "rouge" or "squad" (`evaluation.metrics.METRICS`).
      prompt_lengths: decoder-only prompts' lengths (None: T5, or whole rows).
      batch_size, input_length: every batch is padded to [batch_size, input_length] (default: the
        longest input), so one compiled decoder serves the whole pass.
      max_decode_len: tokens generated per example.
    Returns:
      (`metrics.score`'s dict plus "loop_rate", the decoded texts).
    """
    length = input_length or max(len(x) for x in inputs)
    predictions = []
    for start in range(0, len(inputs), batch_size):
        chunk = list(inputs[start : start + batch_size])
        inputs_BS = np.zeros((batch_size, length), np.int32)
        for i, tokens in enumerate(chunk):
            inputs_BS[i, : len(tokens)] = tokens
        lengths_B = None
        if prompt_lengths is not None:
            lengths_B = np.ones((batch_size,), np.int32)  # padding rows: a one-token prompt
            lengths_B[: len(chunk)] = prompt_lengths[start : start + batch_size]
        out = decode(
            config, params, inputs_BS, GreedySpec(), max_decode_len=max_decode_len,
            prompt_lengths=lengths_B,
        )  # fmt: skip
        tokens_BT = np.asarray(out.tokens)
        predictions.extend(detokenize(tokens_BT[i]) for i in range(len(chunk)))
    refs = list(references) if metric == "squad" else [r[0] for r in references]
    scores = metrics.score(metric, predictions, refs)
    scores["loop_rate"] = metrics.loop_rate(predictions)
    return scores, predictions
