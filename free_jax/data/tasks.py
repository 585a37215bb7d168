"""Tasks: a dataset, the fields that make its input and target texts, a prefix and a metric.

    task = get_task("xsum")
    source = load_source(task, "validation", data_dir="gs://bucket/tfds")
    task.input_text(source[0])     # "summarize: <document>"
    task.target_text(source[0])    # "<summary>"

Reading goes through `tfds.data_source` (array_record files, random access, no TensorFlow) into
grain. A dataset prepared in TFDS's default tfrecord format is read with `tfds.load` instead, which
needs the `tf` extra (`pip install free_jax[tf]`), and is held in memory. A dataset that is not
prepared raises `DatasetNotPreparedError` with the command that prepares it; the two built-in
offline corpora (`system_translations`, `python_docstrings`) prepare themselves on first use.

Tasks over the user's own JSONL files are made with `jsonl_task(...)`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from free_jax.data import builders  # noqa: F401  (registers the offline corpora with TFDS)
from free_jax.data import tokenizer as tokenizer_lib
from free_jax.data.jsonl import JsonlError, get_field, read_jsonl

METRICS = ("rouge", "bleu", "squad")


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset has not been downloaded and prepared in the data_dir; says how to."""


@dataclasses.dataclass(frozen=True)
class Task:
    """What to read and how to turn one example into (input text, target text).

    Attributes:
      name: registry name ("xsum").
      dataset: TFDS name with optional config ("squad/v1.1"), or "jsonl".
      input_field: field holding the input text; "/" separates nested keys and list indices.
      target_field: field holding the target text ("answers/text/0" for SQuAD's first answer).
      metric: "rouge", "bleu" or "squad".
      prefix: prepended to the input text (T5 style: "summarize: ").
      input_template: instead of `input_field`, a str.format template over several fields,
        e.g. "question: {question} context: {context}".
      reference_field: field holding all acceptable targets (a list) for evaluation; by
        default the target alone is the reference.
      train_split, eval_split, test_split: split names (TFDS slicing like "train[:1%]" works).
      tfds_module: module whose import registers the TFDS builder (TFDS loads its legacy
        builders lazily, so `tfds.builder("xsum")` fails until it is imported).
      auto_prepare: prepare the dataset on first use (only for corpora that need no download).
      jsonl_files: for dataset "jsonl", split name -> file path.
      skip_malformed: for dataset "jsonl", skip and count bad lines instead of raising.
    """

    name: str
    dataset: str
    input_field: str = "input"
    target_field: str = "target"
    metric: str = "rouge"
    prefix: str = ""
    input_template: str | None = None
    reference_field: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    tfds_module: str | None = None
    auto_prepare: bool = False
    jsonl_files: Mapping[str, str] = dataclasses.field(default_factory=dict)
    skip_malformed: bool = False

    def __post_init__(self):
        if self.metric not in METRICS:
            raise ValueError(f"Task {self.name}: metric {self.metric!r} is not one of {METRICS}")

    @property
    def input_fields(self) -> tuple[str, ...]:
        """The fields the input text reads."""
        if self.input_template is None:
            return (self.input_field,)
        fields = [f for _, f, _, _ in string.Formatter().parse(self.input_template) if f]
        return tuple(dict.fromkeys(fields))

    def input_text(self, example: Mapping[str, Any]) -> str:
        """`prefix` + the input field (or the filled template) of one raw example."""
        if self.input_template is None:
            body = as_text(get_field(example, self.input_field))
        else:
            values = {f: as_text(get_field(example, f)) for f in self.input_fields}
            body = self.input_template.format(**values)
        return self.prefix + body

    def target_text(self, example: Mapping[str, Any]) -> str:
        """The target text of one raw example (the first one, if the field holds a list)."""
        value = get_field(example, self.target_field)
        if _is_list(value):
            value = value[0]
        return as_text(value)

    def references(self, example: Mapping[str, Any]) -> list[str]:
        """All acceptable targets of one example, for metrics (SQuAD takes the best match)."""
        if self.reference_field is None:
            return [self.target_text(example)]
        value = get_field(example, self.reference_field)
        values = value if _is_list(value) else [value]
        return list(dict.fromkeys(as_text(v) for v in values)) or [self.target_text(example)]


def as_text(value: Any) -> str:
    """str of a field as TFDS (bytes), its mocks (str) or JSON (str, numbers) give it."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return as_text(value.item())
    if isinstance(value, str):
        return value
    if _is_list(value):
        raise TypeError(f"expected one text, got a list of {len(value)}: use a field path /0")
    return str(value)


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or (isinstance(value, np.ndarray) and value.ndim > 0)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

TASKS: dict[str, Task] = {}


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    if task.name in TASKS and not overwrite and TASKS[task.name] != task:
        raise ValueError(f"A different task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"Unknown task {name!r}; registered: {sorted(TASKS)}") from None


def jsonl_task(
    name: str,
    *,
    train_file: str | None = None,
    validation_file: str | None = None,
    test_file: str | None = None,
    input_field: str = "input",
    target_field: str = "target",
    prefix: str = "",
    metric: str = "rouge",
    input_template: str | None = None,
    reference_field: str | None = None,
    skip_malformed: bool = False,
) -> Task:
    """A task over the user's JSONL files (one JSON object per line), not registered."""
    files = {"train": train_file, "validation": validation_file, "test": test_file}
    return Task(
        name=name,
        dataset="jsonl",
        input_field=input_field,
        target_field=target_field,
        metric=metric,
        prefix=prefix,
        input_template=input_template,
        reference_field=reference_field,
        jsonl_files={k: v for k, v in files.items() if v},
        skip_malformed=skip_malformed,
    )


_SUMMARIZE = "summarize: "
for _task in [
    # Summarization (ROUGE). TFDS's cnn_dailymail 3.x is the non-anonymized version the FREE
    # paper's HF "3.0.0" config names.
    Task(
        name="cnn_dailymail",
        dataset="cnn_dailymail",
        input_field="article",
        target_field="highlights",
        prefix=_SUMMARIZE,
        tfds_module="tensorflow_datasets.summarization.cnn_dailymail",
    ),
    Task(
        name="xsum",
        dataset="xsum",
        input_field="document",
        target_field="summary",
        prefix=_SUMMARIZE,
        tfds_module="tensorflow_datasets.summarization.xsum",
    ),
    Task(
        name="samsum",
        dataset="samsum",
        input_field="dialogue",
        target_field="summary",
        prefix=_SUMMARIZE,
    ),
    # Extractive QA as text-to-text (T5's format); EM/F1 against every gold answer.
    Task(
        name="squad",
        dataset="squad/v1.1",
        input_template="question: {question} context: {context}",
        target_field="answers/text/0",
        reference_field="answers/text",
        metric="squad",
        test_split="validation",  # SQuAD v1.1's test set is hidden
    ),
    # Translation (BLEU). The FREE paper translates IWSLT2017 German -> English; IWSLT2017 is not
    # in the TFDS catalog, WMT14 de-en is.
    Task(
        name="wmt14_de_en",
        dataset="wmt14_translate/de-en",
        input_field="de",
        target_field="en",
        prefix="translate German to English: ",
        metric="bleu",
        tfds_module="tensorflow_datasets.translate.wmt14",
    ),
    Task(
        name="wmt14_en_de",
        dataset="wmt14_translate/de-en",
        input_field="en",
        target_field="de",
        prefix="translate English to German: ",
        metric="bleu",
        tfds_module="tensorflow_datasets.translate.wmt14",
    ),
    # Built-in offline corpora (free_jax.data.builders), prepared on first use.
    Task(
        name="system_translations",
        dataset="system_translations",
        input_field="en",
        target_field="de",
        prefix="translate English to German: ",
        metric="bleu",
        auto_prepare=True,
    ),
    Task(
        name="python_docstrings",
        dataset="python_docstrings",
        input_field="code",
        target_field="docstring",
        prefix=_SUMMARIZE,
        auto_prepare=True,
    ),
]:
    register_task(_task)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _tfds_builder(task: Task, data_dir: str | None):
    if task.tfds_module:
        importlib.import_module(task.tfds_module)
    return tfds.builder(task.dataset, data_dir=data_dir)


def _not_prepared_message(task: Task, data_dir: str | None) -> str:
    where = data_dir or "~/tensorflow_datasets (or $TFDS_DATA_DIR)"
    dir_flag = f" --data_dir={data_dir}" if data_dir else ""
    return (
        f"TFDS dataset {task.dataset!r} (task {task.name!r}) is not prepared in {where}. "
        "Prepare it once, as array_record so that no TensorFlow is needed to read it:\n"
        f"    tfds build {task.dataset}{dir_flag} --file_format=array_record\n"
        "or from Python:\n"
        f"    tfds.builder({task.dataset!r}, data_dir={data_dir!r}, "
        "file_format='array_record').download_and_prepare()\n"
        "(some datasets need files downloaded by hand first, and the generation code of many "
        "TFDS catalog datasets imports TensorFlow: pip install free_jax[tf] where it asks)."
    )


def _load_with_tensorflow(builder, split: str, task: Task, *, forced: bool) -> list[dict]:
    try:
        import tensorflow  # noqa: F401
    except ImportError as e:
        if forced:
            reason = "reader='tfds_load' reads with TensorFlow, which is not installed"
        else:
            reason = (
                f"dataset {task.dataset!r} is stored as {builder.info.file_format.value} in "
                f"{builder.data_dir}, which only `tfds.load` (TensorFlow) can read"
            )
        raise ImportError(
            f"{reason}. Install the tf extra: pip install free_jax[tf] -- or prepare the "
            f"dataset as array_record (tfds build {task.dataset} --file_format=array_record) "
            "and read it with reader='auto'."
        ) from e
    # Random access is what grain needs; a tf.data pipeline has none, so the split is held in
    # memory. array_record is the format to use for large datasets.
    return list(tfds.as_numpy(builder.as_dataset(split=split)))


def load_source(
    task: Task,
    split: str,
    *,
    data_dir: str | None = None,
    reader: str = "auto",
) -> Sequence[Mapping[str, Any]]:
    """A random-access sequence of the raw examples of `split` (len and [i]), for grain.

    Args:
      task: the task.
      split: split name; TFDS slices work ("train[:1000]").
      data_dir: TFDS data directory (local or gs://...); None means TFDS's default.
      reader: "auto" (data_source, or tfds.load for tfrecord data), "data_source" or "tfds_load".

    Raises:
      DatasetNotPreparedError: the dataset is not prepared (and cannot prepare itself).
      ImportError: the data is stored as tfrecord (or reader="tfds_load") without TensorFlow.
      JsonlError: a JSONL task's file is malformed, or has no usable records (named in both).
    """
    if task.dataset == "jsonl":
        if split not in task.jsonl_files:
            raise KeyError(f"Task {task.name!r} has no JSONL file for split {split!r}")
        source = read_jsonl(
            task.jsonl_files[split],
            input_field=task.input_fields,
            target_field=task.target_field,
            skip_malformed=task.skip_malformed,
        )
        # Checked at the first read: an empty training file once surfaced, much later, as an
        # empty data shard that named no file.
        if not len(source):
            skipped = (
                f" ({source.num_malformed} malformed and {source.num_missing_field} missing a "
                "field skipped)"
                if source.num_skipped
                else ""
            )
            raise JsonlError(
                f"{source.path}: no usable records for split {split!r} of task "
                f"{task.name!r}{skipped}"
            )
        return source
    if reader not in ("auto", "data_source", "tfds_load"):
        raise ValueError(f"reader must be auto, data_source or tfds_load, got {reader!r}")
    builder = _tfds_builder(task, data_dir)
    prepared = builder.is_prepared()
    random_access = builder.info.available_file_formats() & set(
        tfds.core.FileFormat.with_random_access()
    )
    if reader == "tfds_load" or (reader == "auto" and prepared and not random_access):
        if not prepared:
            raise DatasetNotPreparedError(_not_prepared_message(task, data_dir))
        return _load_with_tensorflow(builder, split, task, forced=reader == "tfds_load")
    if not prepared and task.auto_prepare:
        builder.download_and_prepare()
    try:
        return builder.as_data_source(split=split)
    except Exception as e:
        # TFDS's own message here is about file formats; the useful one says how to prepare.
        if not builder.is_prepared():
            raise DatasetNotPreparedError(_not_prepared_message(task, data_dir)) from e
        raise


def prepare(task: Task, *, data_dir: str | None = None) -> None:
    """Downloads and prepares a task's TFDS dataset as array_record (no-op if prepared)."""
    if task.dataset == "jsonl":
        return
    builder = _tfds_builder(task, data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare(file_format="array_record")


# ---------------------------------------------------------------------------------------------
# Vocabulary
# ---------------------------------------------------------------------------------------------


def iter_texts(task: Task, source: Sequence[Mapping[str, Any]]) -> Iterator[str]:
    """Input and target text of every example, interleaved, in source order."""
    for i in range(len(source)):
        example = source[i]
        yield task.input_text(example)
        yield task.target_text(example)


def task_tokenizer(
    task: Task,
    *,
    vocab_size: int,
    data_dir: str | None = None,
    extra_ids: int = 0,
    max_sentences: int = 1_000_000,
    **train_kwargs,
) -> tokenizer_lib.SentencePieceTokenizer:
    """The SentencePiece vocabulary for a from-scratch run on `task`, trained once and cached.

    Trained on the inputs (with prefix) and targets of the train split and cached at
    `<data_dir>/<dataset>/spm_<vocab_size>.model` (for JSONL tasks: `<data_dir or the train
    file's directory>/<task name>/spm_<vocab_size>.model`).
    """
    if task.dataset == "jsonl":
        root = data_dir or os.path.dirname(os.path.abspath(task.jsonl_files["train"]))
        path = tokenizer_lib.vocabulary_path(root, task.name, vocab_size)
    else:
        root = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
        path = tokenizer_lib.vocabulary_path(
            epath.Path(root).expanduser(), task.dataset, vocab_size
        )
    texts: Callable[[], Iterator[str]] = lambda: iter_texts(
        task, load_source(task, task.train_split, data_dir=data_dir)
    )
    return tokenizer_lib.get_or_train_sentencepiece(
        path,
        texts,
        vocab_size=vocab_size,
        extra_ids=extra_ids,
        max_sentences=max_sentences,
        **train_kwargs,
    )
