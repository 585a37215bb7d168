"""End-to-end training of decoder-only models through the gin entry point: a tiny Llama-style model
from scratch (runs/lm_scratch_cpu.gin), and a LoRA fine-tune of a tiny Hugging Face Llama made here
with transformers (runs/finetune_lm_lora.gin) that leaves the base weights bit-identical."""

import json
import math

import jax
import numpy as np
import pytest
from conftest import REPO
from flax import traverse_util

from free_jax.models import param_shapes
from free_jax.models.lm_config import LMConfig
from free_jax.training import load_trained, read_metrics
from free_jax.training.state import read_saved_state

RUNS = REPO / "gin_configs" / "runs"
SMALL_DATA = [
    "--gin.DataConfig.vocab_size=128", "--gin.DataConfig.vocab_max_sentences=2000",
    "--gin.DataConfig.train_split='train[:256]'", "--gin.DataConfig.eval_split='validation[:8]'",
    "--gin.DataConfig.eval_examples=8", "--gin.DataConfig.max_input_length=16",
    "--gin.DataConfig.max_target_length=16", "--gin.DataConfig.num_threads=1",
    "--gin.BATCH_SIZE=4", "--gin.TrainConfig.eval_batch_size=8",
    "--gin.TrainConfig.max_decode_length=6", "--gin.TrainConfig.progress_bar=False",
    "--gin.TrainConfig.tensorboard=False", "--gin.TrainConfig.log_every=1",
]  # fmt: skip


def _write_jsonl(path, n, seed):
    """n records {"question": ..., "answer": ...} of common words (answer: the question reversed)."""
    words = sorted({w.strip(".,:;()'\"").lower() for w in json.__doc__.split() if w.isalpha()})
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n):
        question = list(rng.choice(words, size=int(rng.integers(2, 6))))
        lines.append(
            json.dumps({"question": " ".join(question), "answer": " ".join(question[::-1])})
        )
    path.write_text("\n".join(lines) + "\n")
    return path


def test_scratch_run_of_a_tiny_decoder_only_model_on_jsonl_files(tmp_path, run_python):
    """runs/lm_scratch_cpu.gin with tasks/jsonl.gin: the user's files, format 'text'."""
    train_file = _write_jsonl(tmp_path / "train.jsonl", 200, seed=0)
    dev_file = _write_jsonl(tmp_path / "dev.jsonl", 8, seed=1)
    model_dir = tmp_path / "lm"
    run_python(
        None, f"--gin_file={RUNS / 'lm_scratch_cpu.gin'}",
        f"--gin_file={REPO / 'gin_configs' / 'tasks' / 'jsonl.gin'}",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.JSONL_TRAIN='{train_file}'",
        f"--gin.JSONL_VALIDATION='{dev_file}'", "--gin.jsonl_task.input_field='question'",
        "--gin.jsonl_task.target_field='answer'", "--gin.DataConfig.format='text'",
        "--gin.TRAIN_STEPS=2", "--gin.EVAL_EVERY=0", "--gin.CHECKPOINT_EVERY=2",
        "--gin.model_config.vocab_size=128", "--gin.model_config.d_model=32",
        "--gin.model_config.d_ff=64", *SMALL_DATA,
        "--gin.DataConfig.train_split=None", "--gin.DataConfig.eval_split=None",  # whole files
        "--gin.DataConfig.vocab_size=64",  # what the small corpus supports
    )  # fmt: skip
    records = read_metrics(model_dir, "train")
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        for key in ("loss", "ce_shallow", "ce_deep", "kd", "acc_shallow", "grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["tokens_per_s"] > 0
    (validation,) = read_metrics(model_dir, "validation")
    assert {f"ce_layer{i}" for i in range(1, 5)} <= set(validation)
    assert "rougeLsum" in validation and "loop_rate" in validation
    assert validation["num_examples"] == 8

    run = json.loads((model_dir / "run.json").read_text())
    assert (run["family"], run["format"], run["bos_id"]) == ("llama", "text", None)
    assert run["task"] == "jsonl"
    config, params, tokenizer_path = load_trained(model_dir)
    assert isinstance(config, LMConfig) and config.d_model == 32 and config.vocab_size == 128
    want = jax.tree.map(lambda x: x.shape, param_shapes(config))
    assert jax.tree.map(lambda x: x.shape, params) == want
    assert tokenizer_path == str(model_dir / "spm.model")
    from free_jax.loading import load_model  # what evaluate / generate read a MODEL_DIR with

    loaded, _, tokenizer = load_model(str(model_dir))
    assert loaded == config and tokenizer.eos_id == config.eos_token_id


def _tiny_hf_llama(directory):
    """A 4-layer Llama with random weights, saved by transformers (safetensors + config.json)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=False,
    )  # fmt: skip
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def test_lora_finetune_of_a_hf_llama_trains_only_the_adapters(tmp_path, tfds_dir, run_python):
    checkpoint = _tiny_hf_llama(tmp_path / "hf_llama")
    model_dir = tmp_path / "lora"
    run_python(
        None, f"--gin_file={RUNS / 'finetune_lm_lora.gin'}",
        f"--gin_file={REPO / 'gin_configs' / 'tasks' / 'system_translations.gin'}",
        f"--gin.MODEL_DIR='{model_dir}'", f"--gin.INITIAL_CHECKPOINT='{checkpoint}'",
        f"--gin.DataConfig.data_dir='{tfds_dir}'", "--gin.TOKENIZER=None", "--gin.TRAIN_STEPS=2",
        "--gin.CHECKPOINT_EVERY=2", "--gin.LoraConfig.rank=4", "--gin.LoraConfig.alpha=8.0",
        "--gin.OptimizerConfig.learning_rate=0.01", *SMALL_DATA,
    )  # fmt: skip
    from free_jax.checkpoints import load_hf

    base_config, base = load_hf(str(checkpoint))
    step, state = read_saved_state(model_dir)
    assert step == 2 and int(state["step"]) == 2
    # The base weights are exactly the checkpoint's: nothing updated them.
    flat_base = traverse_util.flatten_dict(base)
    flat_frozen = traverse_util.flatten_dict(state["frozen"])
    assert flat_frozen.keys() == flat_base.keys()
    for key, value in flat_base.items():
        np.testing.assert_array_equal(np.asarray(flat_frozen[key]), np.asarray(value), str(key))
    # Adapters on every decoder layer's q, k, v, o and MLP kernels; B (zero at the start) moved.
    adapters = traverse_util.flatten_dict(state["params"])
    modules = {k[:-1] for k in adapters}
    assert {m[-1] for m in modules} == {"query", "key", "value", "out", "wi_0", "wi_1", "wo"}
    assert {m[1] for m in modules} == {f"layers_{i}" for i in range(4)}
    assert all(np.abs(np.asarray(v)).max() > 0 for k, v in adapters.items() if k[-1] == "lora_b")

    run = json.loads((model_dir / "run.json").read_text())
    assert run["lora_scale"] == 2.0 and run["family"] == "llama" and run["bos_id"] == 2
    config, merged, _ = load_trained(model_dir)
    assert config == base_config
    flat_merged = traverse_util.flatten_dict(merged)
    for key, value in flat_base.items():
        same = np.array_equal(np.asarray(flat_merged[key]), np.asarray(value))
        assert same == (key[:-1] not in modules), key  # only adapted kernels differ


def test_a_jsonl_task_without_a_validation_file_has_no_validation_set(tmp_path):
    from free_jax.data import jsonl_task
    from free_jax.training import DataConfig, inputs

    task = jsonl_task("mine", train_file=str(_write_jsonl(tmp_path / "train.jsonl", 4, seed=0)))
    data = DataConfig(task=task, format="prompt_target")
    assert inputs.resolve_task(data.task) is task
    empty = inputs.validation_set(data, task, tokenizer=None, batch_size=8, bos_id=None)
    assert empty.batches == [] and empty.inputs == []  # the trainer then skips validation
