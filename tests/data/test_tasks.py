import importlib.util
import json
from pathlib import Path

import pytest
import tensorflow_datasets as tfds

from free_jax.data import tasks as tasks_lib
from free_jax.data.builders import SystemTranslations, SystemTranslationsConfig
from free_jax.data.tokenizer import vocabulary_path

# (task, input fields that must appear in the input text, target field) for the TFDS tasks.
_TFDS_TASKS = [
    ("cnn_dailymail", ["article"], "highlights"),
    ("xsum", ["document"], "summary"),
    ("samsum", ["dialogue"], "summary"),
    ("wmt14_de_en", ["de"], "en"),
    ("wmt14_en_de", ["en"], "de"),
]


def test_registry_has_the_papers_kinds_of_work():
    expected = {
        "cnn_dailymail": "rouge",
        "xsum": "rouge",
        "samsum": "rouge",
        "squad": "squad",
        "wmt14_de_en": "bleu",
        "wmt14_en_de": "bleu",
        "system_translations": "bleu",
        "python_docstrings": "rouge",
    }
    assert {name: tasks_lib.TASKS[name].metric for name in expected} == expected
    assert tasks_lib.get_task("squad").dataset == "squad/v1.1"
    with pytest.raises(KeyError, match="registered: .*xsum"):
        tasks_lib.get_task("no_such_task")
    with pytest.raises(ValueError, match="metric 'accuracy'"):
        tasks_lib.Task(name="x", dataset="x", metric="accuracy")


def test_register_refuses_a_different_task_under_a_taken_name():
    task = tasks_lib.get_task("xsum")
    assert tasks_lib.register_task(task) is task  # the same task again is fine
    with pytest.raises(ValueError, match="already registered"):
        tasks_lib.register_task(tasks_lib.Task(name="xsum", dataset="other"))


@pytest.mark.parametrize("name, input_fields, target_field", _TFDS_TASKS)
def test_field_mapping_on_mock_data(name, input_fields, target_field):
    task = tasks_lib.get_task(name)
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        source = tasks_lib.load_source(task, task.train_split)
        assert len(source) == 3
        example = source[1]
    text = task.input_text(example)
    assert text.startswith(task.prefix)
    assert text == task.prefix + tasks_lib.as_text(example[input_fields[0]])
    assert task.target_text(example) == tasks_lib.as_text(example[target_field])
    assert task.references(example) == [task.target_text(example)]


def test_squad_as_text_to_text_on_mock_data():
    task = tasks_lib.get_task("squad")
    with tfds.testing.mock_data(num_examples=2, policy=tfds.testing.MockPolicy.USE_CODE):
        example = tasks_lib.load_source(task, "validation")[0]
    question, context = (tasks_lib.as_text(example[k]) for k in ("question", "context"))
    assert task.input_text(example) == f"question: {question} context: {context}"
    answers = [tasks_lib.as_text(a) for a in example["answers"]["text"]]
    assert task.target_text(example) == answers[0]
    assert task.references(example) == list(dict.fromkeys(answers))


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
    task = tasks_lib.get_task("samsum")
    with pytest.raises(tasks_lib.DatasetNotPreparedError) as info:
        tasks_lib.load_source(task, "train", data_dir=str(tmp_path))
    message = str(info.value)
    assert f"tfds build samsum --data_dir={tmp_path} --file_format=array_record" in message
    assert "download_and_prepare()" in message


@pytest.fixture
def tiny_translations(tmp_path, locale_dir):
    """system_translations prepared from the test catalogs, as a task, with every split."""
    config = SystemTranslationsConfig(
        name="tiny", locale_dir=str(locale_dir), validation_percent=30, test_percent=30
    )
    SystemTranslations(data_dir=str(tmp_path / "tfds"), config=config).download_and_prepare()
    base = tasks_lib.get_task("system_translations")
    task = tasks_lib.Task(**{**vars(base), "name": "tiny", "dataset": "system_translations/tiny"})
    return task, str(tmp_path / "tfds")


def test_builtin_corpus_task_reads_through_data_source(tiny_translations):
    task, data_dir = tiny_translations
    seen = {}
    for split in (task.train_split, task.eval_split, task.test_split):
        source = tasks_lib.load_source(task, split, data_dir=data_dir)
        for i in range(len(source)):
            seen[task.input_text(source[i])] = task.target_text(source[i])
    assert len(seen) == 11
    assert seen["translate English to German: Close window"] == "Fenster schließen"


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_tfrecord_reading_needs_the_tf_extra(tiny_translations):
    task, data_dir = tiny_translations
    with pytest.raises(ImportError, match=r"reader='tfds_load'.*pip install free_jax\[tf\]"):
        tasks_lib.load_source(task, "train", data_dir=data_dir, reader="tfds_load")
    # Data prepared as tfrecord (TFDS's default when TensorFlow prepares it) is read by tfds.load
    # only. Preparing it needs TensorFlow, so relabel the prepared files' format instead.
    info_path = next(Path(data_dir).glob("system_translations/tiny/*/dataset_info.json"))
    info = json.loads(info_path.read_text())
    info["fileFormat"] = "tfrecord"
    info_path.write_text(json.dumps(info))
    with pytest.raises(ImportError, match=r"stored as tfrecord.*pip install free_jax\[tf\]"):
        tasks_lib.load_source(task, "train", data_dir=data_dir)


def test_builtin_corpus_prepares_itself(tmp_path, locale_dir, monkeypatch):
    """auto_prepare: the first load_source of the default config runs download_and_prepare."""
    # The default config is an instance made at import; point it at the test catalogs.
    monkeypatch.setattr(SystemTranslations.BUILDER_CONFIGS[0], "locale_dir", str(locale_dir))
    task = tasks_lib.get_task("system_translations")
    source = tasks_lib.load_source(task, "train", data_dir=str(tmp_path / "auto"))
    assert len(source) > 0
    assert (tmp_path / "auto" / "system_translations" / "de" / "1.0.0").is_dir()
    tasks_lib.prepare(task, data_dir=str(tmp_path / "explicit"))
    assert (tmp_path / "explicit" / "system_translations" / "de" / "1.0.0").is_dir()
    # Plain TFDS too: an unprepared builtin corpus prepares as array_record, without TensorFlow.
    direct = tfds.data_source("system_translations", data_dir=str(tmp_path / "direct"))
    assert len(direct["train"]) == len(source)


def test_jsonl_task_and_its_vocabulary(tmp_path):
    rows = [{"q": f"frage {i}", "a": {"text": [f"antwort {i}", "x"]}} for i in range(40)]
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    task = tasks_lib.jsonl_task(
        "mine",
        train_file=str(train),
        input_field="q",
        target_field="a/text/0",
        reference_field="a/text",
        prefix="answer: ",
        metric="squad",
    )
    source = tasks_lib.load_source(task, "train")
    assert task.input_text(source[3]) == "answer: frage 3"
    assert task.target_text(source[3]) == "antwort 3"
    assert task.references(source[3]) == ["antwort 3", "x"]
    with pytest.raises(KeyError, match="no JSONL file for split 'validation'"):
        tasks_lib.load_source(task, "validation")

    tok = tasks_lib.task_tokenizer(task, vocab_size=28, data_dir=str(tmp_path / "vocab"))
    assert vocabulary_path(tmp_path / "vocab", "mine", 28).exists()
    assert tok.decode(tok.encode("antwort 17")) == "antwort 17"
