"""Static exit: every token leaves after a fixed decoder layer k (the model truncated at k).

The layers above k never run and their caches are not even allocated. Equivalent to greedy decoding
with the teacher-forced model's `exit_logits[k]` (e.g. `T5(...)(enc, dec, exit_layers=(k,))`).
"""

from __future__ import annotations

import jax

from free_jax.decoding.greedy import single_exit_decode
from free_jax.decoding.state import DecodeResult


def static_decode(
    config,
    params,
    inputs_BS: jax.Array,
    *,
    exit_layer: int,
    max_decode_len: int,
    **kw,
) -> DecodeResult:
    """Greedy decoding through decoder layers [0, exit_layer) and the shared exit head.

    Args:
      exit_layer: k, static, 1 <= k < L (k = L is plain greedy).
      Other options as in `greedy.single_exit_decode`.
    """
    config.check_exit_layer(exit_layer, what="static exit_layer")
    return single_exit_decode(
        config, params, inputs_BS, max_decode_len=max_decode_len, num_layers=exit_layer,
        **kw,
    )  # fmt: skip
