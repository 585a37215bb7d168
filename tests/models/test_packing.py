"""Packing: two examples packed into one row give the same logits as each run alone.

Training packs several short examples per row (segment ids + restarting positions); any leak
across segments in self-, causal or cross-attention, or a position offset, would train the model on
the wrong context without failing any shape test.
"""

import jax
import jax.numpy as jnp
import numpy as np

from free_jax.models import T5, init_params, preset

CONFIG = preset("tiny")


def test_packed_row_matches_examples_run_alone():
    params = init_params(CONFIG, jax.random.key(0))
    model = T5(CONFIG)
    rng = np.random.default_rng(0)
    enc_lens, dec_lens = (5, 3), (4, 6)
    encs = [rng.integers(2, CONFIG.vocab_size, n) for n in enc_lens]
    decs = [rng.integers(2, CONFIG.vocab_size, n) for n in dec_lens]

    def packed(parts, pad):
        tokens = np.concatenate(parts + [np.zeros(pad, np.int64)])
        seg = np.concatenate(
            [np.full(len(p), i + 1) for i, p in enumerate(parts)] + [np.zeros(pad)]
        )
        pos = np.concatenate([np.arange(len(p)) for p in parts] + [np.zeros(pad)])
        return (jnp.asarray(x[None], jnp.int32) for x in (tokens, seg, pos))

    enc, enc_seg, enc_pos = packed(encs, 2)
    dec, dec_seg, dec_pos = packed(decs, 3)
    out = model.apply(
        {"params": params}, enc, dec, exit_layers=(1,),
        encoder_segment_ids_BS=enc_seg, decoder_segment_ids_BT=dec_seg,
        encoder_positions_BS=enc_pos, decoder_positions_BT=dec_pos,
    )  # fmt: skip
    start = 0
    for e, d in zip(encs, decs):
        alone = model.apply(
            {"params": params}, jnp.asarray(e[None], jnp.int32), jnp.asarray(d[None], jnp.int32),
            exit_layers=(1,),
        )  # fmt: skip
        sl = slice(start, start + len(d))
        np.testing.assert_allclose(out.logits[0, sl], alone.logits[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(
            out.exit_logits[1][0, sl], alone.exit_logits[1][0], atol=1e-4, rtol=1e-4
        )
        start += len(d)
