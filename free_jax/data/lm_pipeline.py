"""Token batches for decoder-only (causal) LMs from the same tasks, on `pipeline.py`'s iterator.

An example's input text is the prompt and its target text the continuation. One sequence per
example, B batch, L = max_prompt_length + max_target_length the row length:

    sequence = [BOS] + prompt + target + [EOS]          (BOS only when `bos_id` is given)
    decoder_input_tokens   int32 [B, L]    sequence[:-1], 0-padded
    decoder_target_tokens  int32 [B, L]    sequence[1:], 0-padded
    decoder_loss_weights   float32 [B, L]  format "prompt_target": 1 where the target is a target
                                           token or the EOS; format "text": 1 on every real token
  when packing, also
    decoder_segment_ids    int32 [B, L]    1, 2, ... per packed example, 0 on pad
    decoder_positions      int32 [B, L]    0, 1, ... restarting at each example

A worked packed row (L=8, BOS=B, EOS=E), examples "a b" -> "x y" and "c" -> "z":

    decoder_input_tokens   [B a b x y B c z]
    decoder_target_tokens  [a b x y E c z E]
    decoder_loss_weights   [0 0 1 1 1 0 1 1]    ("text": [1 1 1 1 1 1 1 1])
    decoder_segment_ids    [1 1 1 1 1 2 2 2]
    decoder_positions      [0 1 2 3 4 0 1 2]

[BOS] + prompt keeps its first `max_prompt_length` tokens and target + EOS its first
`max_target_length - 1` tokens and EOS; cuts are counted in the iterator's counters as
num_truncated_inputs / num_truncated_targets. Validation batches (`lm_eval_batches`) also carry
the prompts a decoder continues: `prompt_tokens` [B, max_prompt_length] ([BOS] + prompt,
right-padded) and `prompt_lengths` [B].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from free_jax.data import pipeline
from free_jax.data.tasks import Task
from free_jax.data.tokenizer import Tokenizer

# Which tokens a causal LM is trained to predict: the target only, or the whole text.
LM_FORMATS = ("prompt_target", "text")


def default_bos_id(bos_token_id: int | None, eos_token_id: int) -> int | None:
    """The BOS a model's sequences start with by default: its BOS when it has one distinct from
    its EOS (Llama, Llama-3), else none (GPT-2, Pythia and SmolLM use one id for both).

    >>> default_bos_id(1, 2), default_bos_id(0, 0), default_bos_id(None, 2)
    (1, None, None)
    """
    return bos_token_id if bos_token_id is not None and bos_token_id != eos_token_id else None


@dataclasses.dataclass(frozen=True)
class CausalLayout:
    """`pipeline.Layout` of a decoder-only model: one packed axis of length L (module docstring).

    Attributes:
      max_prompt_length: room for [BOS] + prompt.
      max_target_length: room for target + EOS.
      eos_id: appended after the target.
      bos_id: put before the prompt (None: nothing).
      format: "prompt_target" (loss on the target and EOS) or "text" (loss on every token).
      with_prompts: also write `prompt_tokens` / `prompt_lengths` (validation batches).
    """

    max_prompt_length: int
    max_target_length: int
    eos_id: int
    bos_id: int | None = None
    format: str = "prompt_target"
    with_prompts: bool = False

    def __post_init__(self):
        if self.format not in LM_FORMATS:
            raise ValueError(f"format={self.format!r}; a causal LM trains on one of {LM_FORMATS}")
        if self.max_prompt_length < (self.bos_id is not None) or self.max_target_length < 1:
            raise ValueError("max_prompt_length must hold the BOS and max_target_length the EOS")

    @property
    def length(self) -> int:
        return self.max_prompt_length + self.max_target_length

    @property
    def capacity(self) -> tuple[int]:
        return (self.length,)

    def empty(self, batch_size: int, packed: bool) -> dict[str, np.ndarray]:
        shape = (batch_size, self.length)
        batch = {
            "decoder_input_tokens": np.zeros(shape, np.int32),
            "decoder_target_tokens": np.zeros(shape, np.int32),
            "decoder_loss_weights": np.zeros(shape, np.float32),
        }
        if packed:
            batch["decoder_segment_ids"] = np.zeros(shape, np.int32)
            batch["decoder_positions"] = np.zeros(shape, np.int32)
        if self.with_prompts:
            batch["prompt_tokens"] = np.zeros((batch_size, self.max_prompt_length), np.int32)
            batch["prompt_lengths"] = np.zeros((batch_size,), np.int32)
        return batch

    def _split(self, example: Mapping[str, Any]) -> tuple[int, int, bool, bool]:
        """(prompt part [BOS] + prompt, target part target + EOS, prompt cut?, target cut?)."""
        prompt = len(example["inputs"]) + (self.bos_id is not None)
        target = len(example["targets"]) + 1
        return (
            min(prompt, self.max_prompt_length),
            min(target, self.max_target_length),
            prompt > self.max_prompt_length,
            target > self.max_target_length,
        )

    def room(self, example: Mapping[str, Any]) -> tuple[int]:
        p, t, _, _ = self._split(example)
        return (p + t - 1,)  # inputs and targets are the sequence shifted: one position fewer

    def prepare(self, example: Mapping[str, Any]):
        """((sequence, number of prompt-part tokens), prompt cut?, target cut?)."""
        p, t, cut_prompt, cut_target = self._split(example)
        bos = [] if self.bos_id is None else [self.bos_id]
        prompt = np.asarray(bos + list(example["inputs"]), np.int32)[:p]
        target = np.append(np.asarray(example["targets"], np.int32)[: t - 1], self.eos_id)
        return (np.concatenate([prompt, target]).astype(np.int32), p), cut_prompt, cut_target

    def place(self, batch, row: int, offsets: tuple[int, ...], prepared, segment: int | None):
        sequence, prompt_part = prepared
        at, m = offsets[0], len(sequence) - 1
        span = slice(at, at + m)
        batch["decoder_input_tokens"][row, span] = sequence[:-1]
        batch["decoder_target_tokens"][row, span] = sequence[1:]
        # Position i predicts sequence[i + 1]: a target token from i = prompt_part - 1 on.
        first = 0 if self.format == "text" else max(prompt_part - 1, 0)
        batch["decoder_loss_weights"][row, at + first : at + m] = 1.0
        if segment is not None:
            batch["decoder_segment_ids"][row, span] = segment
            batch["decoder_positions"][row, span] = np.arange(m)
        if self.with_prompts:
            batch["prompt_tokens"][row, :prompt_part] = sequence[:prompt_part]
            batch["prompt_lengths"][row] = prompt_part


def lm_train_batches(
    source: Sequence[Mapping[str, Any]],
    task: Task,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_prompt_length: int,
    max_target_length: int,
    format: str = "prompt_target",
    bos_id: int | None = None,
    **kwargs,
) -> pipeline.TrainIterator:
    """`pipeline.train_batches` with causal-LM rows (module docstring); resumable the same way.

    Args:
      max_prompt_length: room for [BOS] + prompt; max_target_length: for target + EOS.
      format: "prompt_target" or "text".
      bos_id: the model's BOS, put before every prompt (None: none).
      **kwargs: `train_batches`'s seed, num_epochs, pack, shard_index, shard_count, num_threads,
        prefetch_buffer_size.
    """
    layout = CausalLayout(max_prompt_length, max_target_length, tokenizer.eos_id, bos_id, format)
    return pipeline.train_batches(
        source, task, tokenizer, batch_size=batch_size, max_input_length=max_prompt_length,
        max_target_length=max_target_length, layout=layout, **kwargs,
    )  # fmt: skip


def lm_eval_batches(
    source: Sequence[Mapping[str, Any]],
    task: Task,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_prompt_length: int,
    max_target_length: int,
    format: str = "prompt_target",
    bos_id: int | None = None,
    **kwargs,
) -> Iterator[dict[str, Any]]:
    """`pipeline.eval_batches` with causal-LM rows plus `prompt_tokens` and `prompt_lengths`."""
    layout = CausalLayout(
        max_prompt_length, max_target_length, tokenizer.eos_id, bos_id, format, with_prompts=True
    )
    return pipeline.eval_batches(
        source, task, tokenizer, batch_size=batch_size, max_input_length=max_prompt_length,
        max_target_length=max_target_length, layout=layout, **kwargs,
    )  # fmt: skip
