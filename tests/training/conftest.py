"""`REPO` for the training tests (`from conftest import REPO`); their fixtures (`tfds_dir`,
`run_python`, `smoke_args`, ...) are shared with the entry-point tests in tests/conftest.py."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
