"""Text -> token batches: tasks, tokenizers, grain pipelines, JSONL files, offline corpora.

    from free_jax import data

    task = data.get_task("system_translations")           # prepares itself on first use
    train = data.load_source(task, task.train_split, data_dir="/tmp/tfds")
    tok = data.task_tokenizer(task, vocab_size=8000, data_dir="/tmp/tfds")
    batches = data.train_batches(train, task, tok, batch_size=32,
                                 max_input_length=64, max_target_length=64, pack=True)
    batch = next(batches)           # encoder_input_tokens [32, 64], ...
    state = batches.get_state()     # JSON-able; batches.set_state(state) resumes
    lm = data.lm_train_batches(train, task, tok, batch_size=32, max_prompt_length=64,
                               max_target_length=64, format="prompt_target")  # decoder-only

Importing this package registers the `system_translations` and `python_docstrings` TFDS builders.
It imports nothing else from free_jax.
"""

from free_jax.data.builders import (
    PythonDocstrings,
    PythonDocstringsConfig,
    SystemTranslations,
    SystemTranslationsConfig,
)
from free_jax.data.jsonl import JsonlError, JsonlSource, read_jsonl
from free_jax.data.lm_pipeline import (
    LM_FORMATS,
    CausalLayout,
    default_bos_id,
    lm_eval_batches,
    lm_train_batches,
)
from free_jax.data.pipeline import (
    Layout,
    Seq2SeqLayout,
    TrainIterator,
    eval_batches,
    train_batches,
)
from free_jax.data.tasks import (
    TASKS,
    DatasetNotPreparedError,
    Task,
    get_task,
    jsonl_task,
    load_source,
    prepare,
    register_task,
    task_tokenizer,
)
from free_jax.data.tokenizer import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_or_train_sentencepiece,
    load_tokenizer,
    train_sentencepiece,
    vocabulary_path,
)

__all__ = [
    "LM_FORMATS",
    "TASKS",
    "CausalLayout",
    "default_bos_id",
    "DatasetNotPreparedError",
    "HFTokenizer",
    "JsonlError",
    "JsonlSource",
    "Layout",
    "PythonDocstrings",
    "PythonDocstringsConfig",
    "SentencePieceTokenizer",
    "Seq2SeqLayout",
    "SystemTranslations",
    "SystemTranslationsConfig",
    "Task",
    "Tokenizer",
    "TrainIterator",
    "eval_batches",
    "get_or_train_sentencepiece",
    "get_task",
    "jsonl_task",
    "lm_eval_batches",
    "lm_train_batches",
    "load_source",
    "load_tokenizer",
    "prepare",
    "read_jsonl",
    "register_task",
    "task_tokenizer",
    "train_batches",
    "train_sentencepiece",
    "vocabulary_path",
]
