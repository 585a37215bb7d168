"""What the trainer reads, for either model family: the task, its tokenizer, the training batches
and the validation examples.

    task = resolve_task(data.task)               # a registered name, or a Task (jsonl_task(...))
    tokenizer = make_tokenizer(data, task)
    check_model_and_data(model_config, data, tokenizer)
    bos = bos_id_for(model_config, data)         # decoder-only sequences' BOS, or None
    batches = train_iterator(source, task, tokenizer, data, bos, batch_size=32, seed=0)
    validation = validation_set(data, task, tokenizer, batch_size=64, bos_id=bos)

A T5 (data format "seq2seq") reads `data.train_batches`; a decoder-only model ("prompt_target",
"text") reads `data.lm_train_batches` over the same tasks.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from etils import epath

from free_jax import data as data_lib
from free_jax.models import T5Config
from free_jax.models.lm_config import LMConfig
from free_jax.training.config import DataConfig
from free_jax.training.forward import ModelConfig

log = logging.getLogger(__name__)

# Every array a training or validation batch may hold (t5x names).
ARRAY_KEYS = (
    "encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
    "decoder_loss_weights", "encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
    "decoder_positions",
)  # fmt: skip


def check_model_and_data(model_config: ModelConfig, data: DataConfig, tokenizer) -> None:
    """The data format suits the model, and the tokenizer ends texts with the model's EOS."""
    if isinstance(model_config, T5Config) and data.decoder_only:
        raise ValueError(
            f"DataConfig.format={data.format!r} is for decoder-only models; a T5 trains on "
            "format 'seq2seq'"
        )
    if isinstance(model_config, LMConfig):
        if not data.decoder_only:
            raise ValueError(
                "A decoder-only model trains on DataConfig.format 'prompt_target' (loss on the "
                "target) or 'text' (loss on every token), not 'seq2seq'"
            )
        length = data.max_input_length + data.max_target_length
        if model_config.positions == "learned" and length > model_config.max_position_embeddings:
            raise ValueError(
                f"Rows of max_input_length + max_target_length = {length} positions exceed the "
                f"model's {model_config.max_position_embeddings} learned positions"
            )
    if tokenizer.eos_id != model_config.eos_token_id:
        raise ValueError(
            f"The tokenizer's EOS is id {tokenizer.eos_id} but the model's eos_token_id is "
            f"{model_config.eos_token_id}: decoding would never stop where training ends texts. "
            "Set the model's eos_token_id (gin: model_config.eos_token_id) or use the "
            "checkpoint's own tokenizer."
        )


def bos_id_for(model_config: ModelConfig, data: DataConfig) -> int | None:
    """The BOS put before decoder-only sequences (see `DataConfig.add_bos`)."""
    bos = getattr(model_config, "bos_token_id", None)
    if data.add_bos is None:
        return data_lib.default_bos_id(bos, model_config.eos_token_id)
    if data.add_bos and bos is None:
        raise ValueError("DataConfig.add_bos=True but the model has no bos_token_id")
    return bos if data.add_bos else None


def resolve_task(task) -> data_lib.Task:
    """`DataConfig.task`: a registered name, or a Task as it is (`@jsonl_task()` in gin)."""
    return task if isinstance(task, data_lib.Task) else data_lib.get_task(task)


def make_tokenizer(data: DataConfig, task) -> data_lib.Tokenizer:
    """`data.tokenizer_path`'s tokenizer, else the task's SentencePiece vocabulary (trained once)."""
    if data.tokenizer_path:
        return data_lib.load_tokenizer(data.tokenizer_path, extra_ids=data.extra_ids)
    return data_lib.task_tokenizer(
        task,
        vocab_size=data.vocab_size,
        data_dir=data.data_dir,
        extra_ids=data.extra_ids,
        max_sentences=data.vocab_max_sentences,
    )


def save_tokenizer(model_dir: epath.Path, tokenizer, data: DataConfig) -> str | None:
    """Puts the vocabulary into MODEL_DIR (SentencePiece) or records where it is (others)."""
    if isinstance(tokenizer, data_lib.SentencePieceTokenizer):
        path = model_dir / "spm.model"
        path.write_bytes(tokenizer.model_proto)
        return str(path)
    return data.tokenizer_path


def array_batch(batch: dict) -> dict[str, np.ndarray]:
    """The model's arrays of a pipeline batch (texts, prompts and counts left out)."""
    return {k: np.asarray(batch[k]) for k in ARRAY_KEYS if k in batch}


def num_tokens(batch: dict) -> int:
    """Real tokens the step trained on: T5's non-pad inputs plus weighted targets; a decoder-only
    row's positions inside an example (non-pad ids when unpacked)."""
    if "encoder_input_tokens" in batch:
        inputs = int(np.count_nonzero(batch["encoder_input_tokens"]))
        return inputs + int(np.count_nonzero(batch["decoder_loss_weights"]))
    if "decoder_segment_ids" in batch:
        return int(np.count_nonzero(batch["decoder_segment_ids"]))
    return int(np.count_nonzero(batch["decoder_input_tokens"]))


def train_iterator(
    source, task, tokenizer, data: DataConfig, bos_id: int | None, *, batch_size: int, seed: int,
    shard_index: int = 0, shard_count: int = 1,
) -> data_lib.TrainIterator:  # fmt: skip
    """The resumable training batches of `data.format` (this process's shard)."""
    reading = dict(
        batch_size=batch_size, max_target_length=data.max_target_length, seed=seed,
        pack=data.pack, shard_index=shard_index, shard_count=shard_count,
        num_threads=data.num_threads,
    )  # fmt: skip
    if data.decoder_only:
        return data_lib.lm_train_batches(
            source, task, tokenizer, max_prompt_length=data.max_input_length,
            format=data.format, bos_id=bos_id, **reading,
        )  # fmt: skip
    return data_lib.train_batches(
        source, task, tokenizer, max_input_length=data.max_input_length, **reading
    )


@dataclasses.dataclass
class ValidationSet:
    """The validation examples: loss batches, and the inputs greedy decoding continues.

    `inputs` are T5 encoder tokens or decoder-only prompts ([BOS] + prompt, lengths in
    `prompt_lengths`; None for T5).
    """

    batches: list[dict]  # numpy, then placed on the mesh by `train`
    inputs: list[np.ndarray]
    references: list[list[str]]
    metric: str
    prompt_lengths: list[int] | None = None


def validation_set(
    data: DataConfig, task, tokenizer, batch_size: int, bos_id: int | None
) -> ValidationSet:
    """Up to `data.eval_examples` validation examples, in order (none when a JSONL task has no
    file for the split)."""
    split = data.eval_split or task.eval_split
    if task.dataset == "jsonl" and split not in task.jsonl_files:
        log.warning("Task %s has no %s file: training runs without validation", task.name, split)
        return ValidationSet([], [], [], task.metric)
    source = data_lib.load_source(task, split, data_dir=data.data_dir)
    lengths = dict(
        batch_size=batch_size, shard_index=0, shard_count=1, num_threads=data.num_threads,
        max_target_length=data.max_target_length,
    )  # fmt: skip
    if data.decoder_only:
        batches_iter = data_lib.lm_eval_batches(
            source, task, tokenizer, max_prompt_length=data.max_input_length,
            format=data.format, bos_id=bos_id, **lengths,
        )  # fmt: skip
    else:
        batches_iter = data_lib.eval_batches(
            source, task, tokenizer, max_input_length=data.max_input_length, **lengths
        )
    out = ValidationSet([], [], [], task.metric, [] if data.decoder_only else None)
    for batch in batches_iter:
        left = data.eval_examples - len(out.inputs)
        n = min(batch["num_real"], left)
        if n < batch["num_real"]:  # zero the rows past the limit so their losses do not count
            for key in ARRAY_KEYS:
                if key in batch:
                    batch[key][n:] = 0
        out.batches.append(array_batch(batch))
        for i in range(n):
            if data.decoder_only:
                length = int(batch["prompt_lengths"][i])
                out.inputs.append(batch["prompt_tokens"][i, :length])
                out.prompt_lengths.append(length)
            else:
                row = batch["encoder_input_tokens"][i]
                out.inputs.append(row[: np.count_nonzero(row)])
            out.references.append(list(batch["references"][i]))
        if len(out.inputs) >= data.eval_examples:
            break
    return out
