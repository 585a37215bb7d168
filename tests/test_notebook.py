"""The Colab notebook: its shape (cheap checks), and an execution on CPU with nbclient in local mode
(FREE_JAX_NOTEBOOK_LOCAL=1: a tiny random T5 saved as a Hugging Face checkpoint and generated
dialogues instead of FLAN-T5-small and SAMSum)."""

import json
import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "free_colab_demo.ipynb"


def _code(nb) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_notebook_is_clean_and_covers_the_demo():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in cells)  # stored without outputs
    code = _code(nb)
    assert "FREE_JAX_NOTEBOOK_LOCAL" in code[0]  # the first cell reads the flag
    install = code[1]
    assert install.lstrip().startswith("# Install") and "if not LOCAL:" in install
    assert "free_jax[cuda" in install and "git+" in install
    text = "\n".join(code)
    for needle in ('"google/flan-t5-small"', "checkpoints.load_hf(", 'LossConfig(kind="free")',
                   'run("free"', 'run("greedy")', 'method=method', "fit_bmm_threshold(", "plot_calibration(",
                   ".records."):  # fmt: skip
        assert needle in text, needle
    assert nb.metadata["accelerator"] == "GPU"


@pytest.mark.slow
def test_notebook_runs_on_cpu_in_local_mode(tmp_path, monkeypatch):
    """~60 s of CPU: one kernel, a tiny model, 12 training steps, four decoders, one BMM fit."""
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("FREE_JAX_NOTEBOOK_LOCAL", "1")
    monkeypatch.setenv("FREE_JAX_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "3")
    # The tiny model's programs run for milliseconds; skip LLVM's optimisation passes.
    monkeypatch.setenv("XLA_FLAGS", "--xla_backend_optimization_level=0")
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "local test mode" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the calibration plot is shown
    assert (tmp_path / "calibration.png").stat().st_size > 1000
    summary = json.loads((tmp_path / "summary.json").read_text())
    layers = 4  # preset("tiny")
    assert summary["full"]["layers_per_token"] == pytest.approx(layers)
    assert 1 <= summary["free"]["layers_per_token"] <= layers
    assert summary["records"] > 0 and 0.0 <= summary["threshold"] <= 1.0
