"""A model with hand-written logits behind the decoding protocol (t5x's habit for decoder tests).

No weights: the hidden state carries what the logits depend on, so every decoder's output can be
worked out by hand. Hidden channels (D = 4):
  0: the position (absolute cache position), 1: layers run so far (the depth),
  2: the input token, 3: "holes": earlier cache positions of some layer that were never written.

Exit logits at depth d and position p (tables below):
* holes > 0 (a decoder skipped a cache write, e.g. FREE without its deep pass or CALM without
  state copying): token 0 (pad) with margin 0.99 — a broken cache shows up as pad tokens;
* the input token is not the greedy path's token before p ("off the path"): token 5, margin 0.99;
* otherwise TOKENS[d][p] with softmax margin (top-1 minus top-2 probability) MARGINS[d][p].

The greedy path (depth 4) is 2 3 4 2 3 EOS. The shallow exit (depth 1) agrees except at
position 2 (it says 5, unsure) and position 3 (it says 4, sure: a confident mistake).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from free_jax.models import DecoderCache, LayerCache
from free_jax.models.cache import write_layer
from free_jax.models.protocol import DecodeContext, register_family

V, L, P = 6, 4, 16  # vocabulary, layers, table positions
EOS, OFF_PATH = 1, 5
# TOKENS[d][p], MARGINS[d][p] for depth d = 1..4 (row 0 unused); positions past the table's
# greedy path (EOS at 5) repeat EOS.
_DEEP = [2, 3, 4, 2, 3, EOS]
TOKENS = {
    1: [2, 3, 5, 4, 3, EOS],
    2: [2, 3, 4, 2, 4, EOS],
    3: _DEEP,
    4: _DEEP,
}
MARGINS = {
    1: [0.9, 0.8, 0.3, 0.95, 0.6, 0.9],
    2: [0.5, 0.5, 0.85, 0.5, 0.5, 0.5],
    3: [0.7, 0.7, 0.7, 0.7, 0.7, 0.7],
    4: [0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
}
START = 0
# the input the greedy path feeds at each position: the start token, then the path's tokens
ON_PATH_INPUT = np.array([START, *_DEEP, *([EOS] * (P - 1 - len(_DEEP)))], np.int32)


def _table(values, pad):
    out = np.full((L + 1, P), pad, np.float32)
    for d, row in values.items():
        out[d, : len(row)] = row
    return out


TOKEN_DP = _table(TOKENS, EOS).astype(np.int32)
MARGIN_DP = _table(MARGINS, 0.9)


def logits_for(token_X, margin_X):
    """Logits whose softmax puts (1 + m) / 2 on `token` and (1 - m) / 2 on the next token id
    (mod V, skipping nothing), so the top-1 minus top-2 probability is m (up to 1e-6)."""
    second_X = (token_X + 1) % V
    p1, p2 = (1.0 + margin_X) / 2.0, (1.0 - margin_X) / 2.0
    ids_V = jnp.arange(V)
    probs_XV = jnp.where(
        ids_V == token_X[..., None], p1[..., None],
        jnp.where(ids_V == second_X[..., None], p2[..., None], 1e-7),
    )  # fmt: skip
    return jnp.log(probs_XV)


@dataclasses.dataclass(frozen=True)
class StubConfig:
    """The stub's config: what decoders read of a config, nothing else.

    Attributes:
      prompts: behave like a decoder-only model (inputs are prompts prefilled into the cache)
        instead of an encoder-decoder (inputs ignored, decoding starts at position 0).
    """

    prompts: bool = False
    num_decoder_layers: int = L
    shallow_exit_layer: int | None = 1
    vocab_size: int = V
    eos_token_id: int = EOS
    pad_token_id: int = 0
    decoder_start_token_id: int = START
    d_model: int = 4
    dtype: str = "float32"

    @property
    def shallow_layer(self) -> int:
        return self.shallow_exit_layer or 1

    @property
    def compute_dtype(self):
        return jnp.float32

    def check_exit_layer(self, layer, what="exit layer"):
        if not 1 <= layer < self.num_decoder_layers:
            raise ValueError(f"{what}={layer} outside [1, {self.num_decoder_layers})")

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


class StubModel:
    """Implements `free_jax.models.protocol.DecodingModel` with the tables above."""

    def __init__(self, config: StubConfig):
        self.config = config

    def bind_params(self, params):
        del params
        return self

    def init_cache(self, batch, length):
        zeros = jnp.zeros((batch, 1, length, 1), jnp.float32)
        return DecoderCache(layers=tuple(LayerCache(zeros, zeros) for _ in range(L)))

    def start(self, inputs_BS, lengths_B, *, extra_length, num_layers=None):
        b, s = inputs_BS.shape
        num_layers = L if num_layers is None else num_layers
        if not self.config.prompts:
            cache = self.init_cache(b, extra_length)
            first_B, base_B = jnp.full((b,), START, jnp.int32), jnp.zeros((b,), jnp.int32)
        else:
            lengths_B = jnp.full((b,), s, jnp.int32) if lengths_B is None else lengths_B
            cache = self.init_cache(b, s + extra_length)
            # exact prefill: ones at the prompt positions before its last token
            written_BT = jnp.arange(s + extra_length)[None, :] < (lengths_B - 1)[:, None]
            key = written_BT[:, None, :, None].astype(jnp.float32)
            cache = DecoderCache(layers=tuple(LayerCache(key, key) for _ in range(L)))
            first_B = jnp.take_along_axis(inputs_BS, (lengths_B - 1)[:, None], axis=1)[:, 0]
            base_B = lengths_B - 1
        cache = DecoderCache(layers=cache.layers[:num_layers])
        return DecodeContext(first_token_B=first_B.astype(jnp.int32), base_B=base_B), cache

    def embed(self, tokens_BC, offset_B):
        b, c = tokens_BC.shape
        pos_BC = (offset_B[:, None] + jnp.arange(c)[None, :]).astype(jnp.float32)
        zeros = jnp.zeros((b, c), jnp.float32)
        return jnp.stack([pos_BC, zeros, tokens_BC.astype(jnp.float32), zeros], axis=-1)

    def layers(self, hidden_BCD, *, start, end, cache, context, offset_B):
        del context
        b, c, _ = hidden_BCD.shape
        layers = list(cache.layers)
        ones = jnp.ones((b, 1, c, 1), jnp.float32)
        for i in range(start, end):
            layers[i] = write_layer(layers[i], ones, ones, offset_B)
            key_BT = layers[i].key_BHTK[:, 0, :, 0]
            earlier_BCT = jnp.arange(key_BT.shape[1])[None, None, :] < hidden_BCD[..., 0:1]
            holes_BC = jnp.sum(earlier_BCT * (1.0 - key_BT[:, None, :]), axis=-1)
            hidden_BCD = hidden_BCD + jnp.stack(
                [jnp.zeros_like(holes_BC), jnp.ones_like(holes_BC), jnp.zeros_like(holes_BC),
                 holes_BC], axis=-1,
            )  # fmt: skip
        return hidden_BCD, DecoderCache(layers=tuple(layers))

    def exit_logits(self, hidden_XD, layer=None):
        del layer  # the depth channel already says which exit this is
        pos_X = jnp.clip(hidden_XD[..., 0].astype(jnp.int32), 0, P - 1)
        depth_X = jnp.clip(hidden_XD[..., 1].astype(jnp.int32), 0, L)
        token_X = hidden_XD[..., 2].astype(jnp.int32)
        holes_X = hidden_XD[..., 3]
        on_path_X = token_X == jnp.asarray(ON_PATH_INPUT)[pos_X]
        table_token = jnp.asarray(TOKEN_DP)[depth_X, pos_X]
        table_margin = jnp.asarray(MARGIN_DP)[depth_X, pos_X]
        tok_X = jnp.where(holes_X > 0, 0, jnp.where(on_path_X, table_token, OFF_PATH))
        margin_X = jnp.where((holes_X > 0) | ~on_path_X, 0.99, table_margin)
        return logits_for(tok_X, margin_X).astype(jnp.float32)

    def final_norm(self, hidden_XD):
        return hidden_XD

    def layer_kv(self, hidden_BCD, layer, offset_B):
        del layer, offset_B
        ones = jnp.ones(hidden_BCD.shape[:2], jnp.float32)[:, None, :, None]
        return ones, ones


register_family(StubConfig, StubModel)
