"""Loading and saving T5 parameters: Hugging Face, T5X and free_jax's own (orbax) format."""

from free_jax.checkpoints.hf import load_hf, save_hf
from free_jax.checkpoints.store import load_params, save_params
from free_jax.checkpoints.t5x import load_t5x, save_t5x

__all__ = ["load_hf", "load_params", "load_t5x", "save_hf", "save_params", "save_t5x"]
