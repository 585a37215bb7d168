"""Training: FREE / CALM / CE losses, exit-head self-distillation, optax optimisers, LoRA, the loop,
checkpoints, validation.

T5 and decoder-only models alike (`forward.forward` is the one place a model is called):

from free_jax.training import DataConfig, TrainConfig, train, load_trained
train(TrainConfig(model_dir="runs/x", train_steps=1000), preset("tiny"), DataConfig())
train(TrainConfig(model_dir="runs/lm", train_steps=1000), lm_preset("tiny-llama"),
      DataConfig(format="prompt_target"))
config, params, tokenizer_path = load_trained("runs/x")
train(TrainConfig(model_dir="runs/heads", train_steps=1000, exit_heads=3,
                  loss=LossConfig(kind="exit_heads")), None, DataConfig(format="text"))
config, heads = load_trained_exit_heads("runs/heads")
"""

from free_jax.training.config import (
    DATA_FORMATS,
    DataConfig,
    NonFiniteLossError,
    TrainConfig,
    TrainResult,
)
from free_jax.training.forward import Forward, ModelConfig, forward
from free_jax.training.lora import LoraConfig, init_lora, lora_interceptor, merge_lora
from free_jax.training.losses import (
    LossConfig,
    calm_loss,
    ce_loss,
    compute_loss,
    cross_entropy,
    distillation_loss,
    dynamic_alignment,
    exit_heads_loss,
    free_loss,
    teacher_layers,
    token_kl,
)
from free_jax.training.metrics import MetricsWriter, read_metrics
from free_jax.training.optim import OptimizerConfig, make_optimizer, make_schedule
from free_jax.training.state import (
    CheckpointConfig,
    TrainState,
    load_trained,
    load_trained_exit_heads,
)
from free_jax.training.trainer import train
from free_jax.training.validation import (
    decode_and_score,
    exit_head_validation,
    validation_losses,
)

__all__ = [
    "DATA_FORMATS",
    "CheckpointConfig",
    "DataConfig",
    "Forward",
    "LoraConfig",
    "LossConfig",
    "MetricsWriter",
    "ModelConfig",
    "NonFiniteLossError",
    "OptimizerConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "calm_loss",
    "ce_loss",
    "compute_loss",
    "cross_entropy",
    "distillation_loss",
    "dynamic_alignment",
    "exit_head_validation",
    "exit_heads_loss",
    "free_loss",
    "decode_and_score",
    "forward",
    "init_lora",
    "load_trained",
    "load_trained_exit_heads",
    "lora_interceptor",
    "make_optimizer",
    "make_schedule",
    "merge_lora",
    "read_metrics",
    "teacher_layers",
    "token_kl",
    "train",
    "validation_losses",
]
