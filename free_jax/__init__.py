"""free_jax: FREE (Fast and Robust Early-Exiting, Bae et al. 2023) for T5 in JAX/Flax."""

from free_jax.models import T5, T5Config, preset

__version__ = "0.1.0"
__all__ = ["T5", "T5Config", "preset"]
