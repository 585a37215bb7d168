"""Tiny random Hugging Face decoder-only checkpoints for parity tests (needs torch + transformers).

    path = make_hf_checkpoint("llama", tmp_path / "llama", num_key_value_heads=2)
    model = load_hf_model(path)                      # eval mode, float32, eager attention
    logits = hf_logits(model, tokens_BT, lengths_B)  # right-padded batch

Weights are drawn with a large initializer range and norms/biases are perturbed, so every
parameter moves the logits well above the 1e-4 tolerance the parity tests use.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Small shapes with odd head counts and grouped / partial rotary attention per family.
DEFAULTS = {
    "llama": dict(
        vocab_size=96, hidden_size=24, intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
    "gpt_neox": dict(
        vocab_size=80, hidden_size=24, intermediate_size=56, num_hidden_layers=3,
        num_attention_heads=3, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=64,
        use_parallel_residual=True, tie_word_embeddings=False,
    ),
    "gpt2": dict(vocab_size=72, n_embd=24, n_layer=3, n_head=3, n_positions=32),
}  # fmt: skip
TOKENS = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)


def build_hf_model(family: str, seed: int = 0, **config_kw):
    """A random `AutoModelForCausalLM` of `family` (eval mode, float32)."""
    import torch
    import transformers

    config_cls = dict(
        llama=transformers.LlamaConfig,
        gpt_neox=transformers.GPTNeoXConfig,
        gpt2=transformers.GPT2Config,
    )[family]
    kw = {**DEFAULTS[family], **TOKENS, "initializer_range": 0.2, **config_kw}
    if family == "gpt2":
        kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    config = config_cls(**kw)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        config, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():  # initialisation leaves norms at 1 and biases at 0: move them
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name or name.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def make_hf_checkpoint(
    family: str, path: Path, *, seed: int = 0, max_shard_size: str | None = None, **config_kw
) -> Path:
    """Saves `build_hf_model(family, seed, **config_kw)` with `save_pretrained` (safetensors)."""
    model = build_hf_model(family, seed, **config_kw)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kw)
    return Path(path)


def load_hf_model(path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()


def hf_logits(model, tokens_BT: np.ndarray, lengths_B: np.ndarray | None = None) -> np.ndarray:
    """[B, T, V] float32 logits; `lengths_B` marks right padding (given as the attention mask)."""
    import torch

    b, t = tokens_BT.shape
    lengths_B = np.full((b,), t) if lengths_B is None else np.asarray(lengths_B)
    mask_BT = np.arange(t)[None, :] < lengths_B[:, None]
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(np.asarray(tokens_BT), dtype=torch.long),
            attention_mask=torch.tensor(mask_BT, dtype=torch.long),
        )
    return out.logits.float().numpy()


def right_padded_batch(vocab_size: int, lengths=(12, 7, 3), seed: int = 0):
    """Random tokens [B, max(lengths)] padded with 0 on the right, and the lengths."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab_size, size=(len(lengths), max(lengths)))
    lengths = np.asarray(lengths)
    tokens[np.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return tokens, lengths
