"""Fixed-shape token batches for T5 training and evaluation, with grain underneath.

Keys (t5x's names), B batch, S max input length, T max target length:

    encoder_input_tokens   int32 [B, S]   input ids + EOS, 0-padded
    decoder_target_tokens  int32 [B, T]   target ids + EOS, 0-padded
    decoder_input_tokens   int32 [B, T]   targets shifted right, 0 (decoder start) first, 0 on pad
    decoder_loss_weights   float32 [B, T] 1 on real target tokens including EOS
  when packing, also
    encoder_segment_ids, decoder_segment_ids   int32   1, 2, ... per packed example, 0 on pad
    encoder_positions, decoder_positions       int32   0, 1, ... restarting at each example

A worked packed row (S=T=6, EOS=1), two examples "a b" -> "x" and "c" -> "y z":

    encoder_input_tokens  [a b 1 c 1 0]    decoder_target_tokens [x 1 y z 1 0]
    encoder_segment_ids   [1 1 1 2 2 0]    decoder_input_tokens  [0 x 0 y z 0]
    encoder_positions     [0 1 2 0 1 0]    decoder_segment_ids   [1 1 2 2 2 0]
                                           decoder_positions     [0 1 0 1 2 0]
                                           decoder_loss_weights  [1 1 1 1 1 0]

Sequences longer than S (T) keep their first S-1 (T-1) tokens and EOS; they are counted in
`TrainIterator.counters` so the trainer can log how much text was cut.

How an example becomes row content is a `Layout`: `Seq2SeqLayout` here (the keys above), the
decoder-only one in `lm_pipeline.py`. The iterator, its packing and its resumable state are shared.

Training order: the process's shard (`[shard_index::shard_count]`), shuffled by `seed` with a
new permutation each epoch, repeated `num_epochs` times (forever by default). Examples are read,
tokenized and prefetched by grain threads; the iterator's position is a small JSON-able dict
(`get_state` / `set_state`), so a resumed run continues with exactly the next batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from free_jax.data.tasks import Task
from free_jax.data.tokenizer import Tokenizer


def _default_shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only for the process layout; the data package needs no devices

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index {shard_index} is not in [0, {shard_count})")
    return shard_index, shard_count


@dataclasses.dataclass(frozen=True)
class _Tokenize:
    """grain map: raw example -> {"inputs", "targets"} ids without EOS (+ texts for eval).

    A callable class rather than a closure so that grain can pickle it into worker processes.
    """

    task: Task
    tokenizer: Tokenizer
    with_texts: bool = False

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        input_text = self.task.input_text(example)
        target_text = self.task.target_text(example)
        out = {
            "inputs": np.asarray(self.tokenizer.encode(input_text), np.int32),
            "targets": np.asarray(self.tokenizer.encode(target_text), np.int32),
        }
        if self.with_texts:
            out["input_text"] = input_text
            out["target_text"] = target_text
            out["references"] = self.task.references(example)
        return out


def _with_eos(ids: np.ndarray, max_length: int, eos_id: int) -> tuple[np.ndarray, bool]:
    """ids[:max_length - 1] + [EOS], and whether anything was cut."""
    truncated = len(ids) + 1 > max_length
    return np.append(ids[: max_length - 1], np.int32(eos_id)).astype(np.int32), truncated


def _empty_batch(batch_size: int, s: int, t: int, packed: bool) -> dict[str, np.ndarray]:
    batch = {
        "encoder_input_tokens": np.zeros((batch_size, s), np.int32),
        "decoder_target_tokens": np.zeros((batch_size, t), np.int32),
        "decoder_input_tokens": np.zeros((batch_size, t), np.int32),
        "decoder_loss_weights": np.zeros((batch_size, t), np.float32),
    }
    if packed:
        for side, length in (("encoder", s), ("decoder", t)):
            batch[f"{side}_segment_ids"] = np.zeros((batch_size, length), np.int32)
            batch[f"{side}_positions"] = np.zeros((batch_size, length), np.int32)
    return batch


def _place(batch, row: int, enc_at: int, dec_at: int, inputs, targets, segment: int | None):
    """Writes one example (EOS already appended) into `row` at the given offsets.

    The decoder input is the target shifted right by one *within the example*, so each packed
    segment starts from the decoder start token 0 and never sees its neighbour's last token.
    """
    n, m = len(inputs), len(targets)
    batch["encoder_input_tokens"][row, enc_at : enc_at + n] = inputs
    batch["decoder_target_tokens"][row, dec_at : dec_at + m] = targets
    batch["decoder_input_tokens"][row, dec_at + 1 : dec_at + m] = targets[:-1]
    batch["decoder_loss_weights"][row, dec_at : dec_at + m] = 1.0
    if segment is not None:
        batch["encoder_segment_ids"][row, enc_at : enc_at + n] = segment
        batch["decoder_segment_ids"][row, dec_at : dec_at + m] = segment
        batch["encoder_positions"][row, enc_at : enc_at + n] = np.arange(n)
        batch["decoder_positions"][row, dec_at : dec_at + m] = np.arange(m)


class Layout(Protocol):
    """How tokenized examples ({"inputs", "targets"} ids without EOS) become rows of a batch.

    A row has one or more packed axes (T5: the encoder's S and the decoder's T; a decoder-only
    model: one). `capacity` is each axis's length, `room(example)` what one example takes on each
    after truncation; the iterator packs by first fit on every axis at once.
    """

    capacity: tuple[int, ...]

    def empty(self, batch_size: int, packed: bool) -> dict[str, np.ndarray]:
        """All-zero arrays of one batch (segment ids and positions too when `packed`)."""

    def room(self, example: Mapping[str, Any]) -> tuple[int, ...]:
        """Positions the example takes on each packed axis."""

    def prepare(self, example: Mapping[str, Any]) -> tuple[Any, bool, bool]:
        """(what `place` writes, input cut?, target cut?)."""

    def place(self, batch, row: int, offsets: tuple[int, ...], prepared, segment: int | None):
        """Writes a prepared example into `row` at `offsets`; `segment` (1, 2, ...) when packed."""


@dataclasses.dataclass(frozen=True)
class Seq2SeqLayout:
    """T5's rows (the module docstring's keys): input + EOS on the encoder axis, target + EOS on
    the decoder axis."""

    max_input_length: int
    max_target_length: int
    eos_id: int

    @property
    def capacity(self) -> tuple[int, int]:
        return self.max_input_length, self.max_target_length

    def empty(self, batch_size: int, packed: bool) -> dict[str, np.ndarray]:
        return _empty_batch(batch_size, self.max_input_length, self.max_target_length, packed)

    def room(self, example: Mapping[str, Any]) -> tuple[int, int]:
        return (
            min(len(example["inputs"]) + 1, self.max_input_length),
            min(len(example["targets"]) + 1, self.max_target_length),
        )

    def prepare(self, example: Mapping[str, Any]):
        inputs, cut_inputs = _with_eos(example["inputs"], self.max_input_length, self.eos_id)
        targets, cut_targets = _with_eos(example["targets"], self.max_target_length, self.eos_id)
        return (inputs, targets), cut_inputs, cut_targets

    def place(self, batch, row: int, offsets: tuple[int, ...], prepared, segment: int | None):
        inputs, targets = prepared
        _place(batch, row, offsets[0], offsets[1], inputs, targets, segment)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


class TrainIterator(Iterator[dict[str, np.ndarray]]):
    """Batches of a tokenized grain dataset, checkpointable, with truncation counters.

    Without packing a batch is the next B examples. With packing each example goes into the
    first of the B rows where it still fits on every axis of the layout (greedy first fit); the
    first example that fits no row closes the batch and opens the next one. That example is read
    but not yet placed, so `get_state` reports the grain position from *before* it was read: a
    restored iterator reads it again, and the counters only count placed examples.
    """

    def __init__(
        self,
        dataset: grain.MapDataset,
        *,
        batch_size: int,
        layout: Layout,
        pack: bool,
        read_options: grain.ReadOptions,
    ):
        self._dataset = dataset
        self._read_options = read_options
        self.batch_size = batch_size
        self.layout = layout
        self.pack = pack
        self._iterator = dataset.to_iter_dataset(read_options).__iter__()
        self._pending: tuple[dict, dict] | None = None  # (example, grain state before it)
        self.counters = {
            "num_examples": 0,
            "num_truncated_inputs": 0,
            "num_truncated_targets": 0,
            "num_batches": 0,
        }

    def _prepare(self, example: dict):
        prepared, cut_inputs, cut_targets = self.layout.prepare(example)
        self.counters["num_examples"] += 1
        self.counters["num_truncated_inputs"] += int(cut_inputs)
        self.counters["num_truncated_targets"] += int(cut_targets)
        return prepared

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.layout.empty(self.batch_size, self.pack)
        if self.pack:
            self._fill_packed(batch)
        else:
            # A partial last batch of a finite run is dropped (StopIteration): shapes stay fixed.
            examples = [next(self._iterator) for _ in range(self.batch_size)]
            zeros = (0,) * len(self.layout.capacity)
            for row, example in enumerate(examples):
                self.layout.place(batch, row, zeros, self._prepare(example), segment=None)
        self.counters["num_batches"] += 1
        return batch

    def _fill_packed(self, batch: dict[str, np.ndarray]) -> None:
        capacity = self.layout.capacity
        fill = [[0] * len(capacity) for _ in range(self.batch_size)]
        segments = [0] * self.batch_size
        placed = 0
        while True:
            if self._pending is not None:
                example, state_before = self._pending
                self._pending = None
            else:
                state_before = self._iterator.get_state()
                try:
                    example = next(self._iterator)
                except StopIteration:
                    if placed:
                        return  # the last, partly filled batch of a finite run
                    raise
            room = self.layout.room(example)
            row = next(
                (
                    r
                    for r in range(self.batch_size)
                    if all(f + n <= c for f, n, c in zip(fill[r], room, capacity))
                ),
                None,
            )
            if row is None:
                self._pending = (example, state_before)
                return
            segments[row] += 1
            prepared = self._prepare(example)
            self.layout.place(batch, row, tuple(fill[row]), prepared, segments[row])
            fill[row] = [f + n for f, n in zip(fill[row], room)]
            placed += 1

    def get_state(self) -> dict[str, Any]:
        """The position after the last batch returned: JSON-able, a few numbers."""
        grain_state = self._pending[1] if self._pending is not None else self._iterator.get_state()
        return {"grain": grain_state, "counters": dict(self.counters)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues from `state`, so the next batch is the one after those already seen."""
        self._iterator = self._dataset.to_iter_dataset(self._read_options).__iter__()
        self._iterator.set_state(state["grain"])
        self._pending = None
        self.counters = dict(state["counters"])


def train_batches(
    source: Sequence[Mapping[str, Any]],
    task: Task,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_input_length: int,
    max_target_length: int,
    seed: int = 0,
    num_epochs: int | None = None,
    pack: bool = False,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    prefetch_buffer_size: int = 128,
    layout: Layout | None = None,
) -> TrainIterator:
    """A checkpointable iterator of training batches (see module docstring for the keys).

    Args:
      source: random-access raw examples (`tasks.load_source`, a TFDS data source, a list).
      task: turns a raw example into input and target texts.
      tokenizer: text -> ids (no EOS; added here).
      batch_size: B, per process.
      max_input_length: S, including EOS.
      max_target_length: T, including EOS.
      seed: shuffling seed; each epoch is a different permutation derived from it.
      num_epochs: None repeats forever; otherwise stops after that many passes.
      pack: pack several examples per row (adds segment ids and positions).
      shard_index, shard_count: this process's shard; default jax.process_index()/count().
      num_threads, prefetch_buffer_size: grain's reading/tokenizing threads and read-ahead.
      layout: how examples become rows; None is T5's `Seq2SeqLayout` of the two max lengths
        (`lm_pipeline.lm_train_batches` passes the decoder-only one).
    """
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    dataset = grain.MapDataset.source(source)[shard_index::shard_count]
    if len(dataset) == 0:
        raise ValueError(
            f"Shard {shard_index} of {shard_count} of a source of {len(source)} examples is empty"
        )
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs).map(_Tokenize(task, tokenizer))
    if layout is None:
        layout = Seq2SeqLayout(max_input_length, max_target_length, tokenizer.eos_id)
    return TrainIterator(
        dataset,
        batch_size=batch_size,
        layout=layout,
        pack=pack,
        read_options=grain.ReadOptions(
            num_threads=num_threads, prefetch_buffer_size=prefetch_buffer_size
        ),
    )


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def eval_batches(
    source: Sequence[Mapping[str, Any]],
    task: Task,
    tokenizer: Tokenizer,
    *,
    batch_size: int,
    max_input_length: int,
    max_target_length: int,
    shard_index: int | None = None,
    shard_count: int | None = None,
    num_threads: int = 2,
    layout: Layout | None = None,
) -> Iterator[dict[str, Any]]:
    """Every example of this process's shard exactly once, in order, in fixed-shape batches.

    Each batch has the training keys (no packing) plus
      num_real      int         examples in this batch that are real (the rest is padding)
      example_mask  bool [B]    True for the first `num_real` rows
      inputs        list[str]   input texts (with prefix), `num_real` of them
      targets       list[str]   target texts
      references    list[list[str]]  all acceptable targets per example, for metrics
    The final batch is padded with all-zero rows (loss weights 0), so shapes never change.
    Truncation affects only the token arrays; the texts stay whole for the metrics. `layout` as
    in `train_batches` (never packed here).
    """
    if layout is None:
        layout = Seq2SeqLayout(max_input_length, max_target_length, tokenizer.eos_id)
    zeros = (0,) * len(layout.capacity)
    shard_index, shard_count = _default_shard(shard_index, shard_count)
    dataset = grain.MapDataset.source(source)[shard_index::shard_count]
    dataset = dataset.map(_Tokenize(task, tokenizer, with_texts=True))
    examples = iter(dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    done = False
    while not done:
        batch = layout.empty(batch_size, packed=False)
        texts = {"inputs": [], "targets": [], "references": []}
        for row in range(batch_size):
            example = next(examples, None)
            if example is None:
                done = True
                break
            prepared, _, _ = layout.prepare(example)
            layout.place(batch, row, zeros, prepared, segment=None)
            texts["inputs"].append(example["input_text"])
            texts["targets"].append(example["target_text"])
            texts["references"].append(example["references"])
        num_real = len(texts["inputs"])
        if num_real == 0:
            return
        batch["num_real"] = num_real
        batch["example_mask"] = np.arange(batch_size) < num_real
        batch.update(texts)
        yield batch
