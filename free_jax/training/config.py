"""What a training run is given and what it returns: plain dataclasses that gin builds.

`DataConfig` (the task and its pipeline), `TrainConfig` (the run: steps, batch, loss, optimiser,
checkpoints, partitioning), `TrainResult` (what `train` returns) and the error a non-finite loss
raises. Kept apart from the loop so configs and tools can import them without the trainer.
"""

from __future__ import annotations

import dataclasses

from free_jax.data.tasks import Task
from free_jax.models.field_types import check_field_types
from free_jax.partitioning import PartitionConfig
from free_jax.training.lora import LoraConfig
from free_jax.training.losses import LossConfig
from free_jax.training.optim import OptimizerConfig
from free_jax.training.state import CheckpointConfig

INITIAL_CHECKPOINT_FORMATS = ("auto", "hf", "t5x", "free_jax")


class NonFiniteLossError(FloatingPointError):
    """Training produced NaN or inf; the message names the step and the last good checkpoint."""


# How a task's (input, target) texts become training rows: T5's encoder/decoder pairs, or one
# decoder-only sequence with the loss on the target only or on every token.
DATA_FORMATS = ("seq2seq", "prompt_target", "text")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What to train on, and how it is tokenized and cut.

    Attributes:
      task: a name from `free_jax.data.get_task` ("system_translations", "xsum", ...) or a `Task`
        (e.g. `free_jax.data.jsonl_task(...)` over the user's files; gin: `@jsonl_task()`).
      format: "seq2seq" (T5: input to the encoder, target to the decoder), "prompt_target"
        (decoder-only: [BOS] + input + target + EOS, loss on the target and EOS) or "text"
        (decoder-only: the same sequence, loss on every token); see `data.lm_pipeline`.
      add_bos: put the model's BOS before every decoder-only sequence; None: when the model has a
        BOS distinct from its EOS (Llama, Llama-3: yes; GPT-2, Pythia, SmolLM: no, as their
        tokenizers do).
      data_dir: TFDS data directory; None means TFDS's default.
      tokenizer_path: SentencePiece .model, tokenizer.json or a checkpoint directory; None trains a
        SentencePiece vocabulary of `vocab_size` on the task's training texts (cached beside the
        data) -- the from-scratch recipe.
      vocab_size, vocab_max_sentences: size of a trained vocabulary, and how many texts train it.
      extra_ids: T5 sentinel ids after a SentencePiece vocabulary (100 for T5 checkpoints).
      max_input_length, max_target_length: S and T, EOS included; longer texts are cut (counted
        in the logs as num_truncated_inputs / num_truncated_targets). Decoder-only rows hold
        S + T positions: [BOS] + prompt in S, target + EOS in T.
      pack: pack several examples per row.
      train_split, eval_split: None uses the task's; TFDS slices work ("train[:1000]").
      eval_examples: validation examples decoded and scored at each evaluation.
      num_threads: grain threads for reading and tokenizing.
    """

    task: str | Task = "system_translations"
    format: str = "seq2seq"
    add_bos: bool | None = None
    data_dir: str | None = None
    tokenizer_path: str | None = None
    vocab_size: int = 8000
    vocab_max_sentences: int = 1_000_000
    extra_ids: int = 0
    max_input_length: int = 64
    max_target_length: int = 64
    pack: bool = False
    train_split: str | None = None
    eval_split: str | None = None
    eval_examples: int = 256
    num_threads: int = 2

    def __post_init__(self):
        check_field_types(self)
        if self.format not in DATA_FORMATS:
            raise ValueError(f"DataConfig.format={self.format!r}; expected one of {DATA_FORMATS}")

    @property
    def decoder_only(self) -> bool:
        return self.format != "seq2seq"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run.

    Attributes:
      model_dir: where checkpoints, config.json, run.json and metrics go; a restart resumes here.
      train_steps: batches to train on (with gradient accumulation, k batches make one update).
      batch_size: examples (rows, when packing) per batch.
      seed: parameter init, LoRA init, dropout and data order.
      eval_every: validate every N steps (0: only at the end).
      log_every: write training metrics every N steps.
      loss, optimizer, checkpoint: see their classes.
      lora: fine-tune low-rank adapters only (None: train every parameter).
      exit_heads: train self-supervised exit heads (`models.exit_heads`) on a frozen backbone:
        a count n (heads spread evenly, `models.exit_heads.default_exit_head_layers`) or the
        decoder layers themselves, e.g. (3, 6, 9). Goes with `LossConfig(kind="exit_heads")`;
        only the heads train and MODEL_DIR/exit_heads.msgpack holds them.
      initial_checkpoint: start from these weights (a Hugging Face directory or hub name of a T5
        or a decoder-only model, a T5X checkpoint directory, a free_jax export or a training
        MODEL_DIR) instead of a random init. The model config then comes from the checkpoint
        unless one is passed, which must match its shapes.
      initial_checkpoint_format: "hf", "t5x", "free_jax" (an export of `checkpoints.save_params`
        or a training MODEL_DIR) or "auto" (told apart by the files in the directory).
      eval_batch_size: batch size of validation losses and decodes.
      max_decode_length: greedy decode length at validation (None: max_target_length).
      progress_bar, tensorboard: outputs besides metrics.jsonl.
      partition: the device mesh and sharding strategy; `batch_size` is the global batch and must
        be a multiple of the mesh's data axes. The default is data parallel over every device.
    """

    model_dir: str
    train_steps: int
    batch_size: int = 32
    seed: int = 0
    eval_every: int = 0
    log_every: int = 10
    loss: LossConfig = LossConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    lora: LoraConfig | None = None
    exit_heads: int | tuple[int, ...] | None = None
    initial_checkpoint: str | None = None
    initial_checkpoint_format: str = "auto"
    eval_batch_size: int = 64
    max_decode_length: int | None = None
    progress_bar: bool = True
    tensorboard: bool = True
    partition: PartitionConfig = PartitionConfig()

    def __post_init__(self):
        check_field_types(self)
        if self.train_steps < 1 or self.batch_size < 1:
            raise ValueError("train_steps and batch_size must be >= 1")
        if self.initial_checkpoint_format not in INITIAL_CHECKPOINT_FORMATS:
            raise ValueError(
                f"initial_checkpoint_format={self.initial_checkpoint_format!r}; "
                f"expected one of {INITIAL_CHECKPOINT_FORMATS}"
            )
        heads_loss = self.loss.kind == "exit_heads"
        if (self.exit_heads is not None) != heads_loss:
            raise ValueError(
                "TrainConfig.exit_heads and LossConfig.kind='exit_heads' go together: set both "
                f"(got exit_heads={self.exit_heads!r}, loss kind {self.loss.kind!r})"
            )
        if heads_loss and self.lora is not None:
            raise ValueError("exit heads train on a frozen backbone: leave TrainConfig.lora None")
        if isinstance(self.exit_heads, list):  # gin and JSON give lists
            object.__setattr__(self, "exit_heads", tuple(self.exit_heads))


@dataclasses.dataclass
class TrainResult:
    """What a finished run leaves: the final step and the last metrics of each kind."""

    model_dir: str
    step: int
    train_metrics: dict[str, float]
    validation_metrics: dict[str, float]
    resumed_from: int | None
