"""The MNIST notebook: committed without outputs, and runs top to bottom with tiny settings.

The slow test executes the notebook with nbclient in a kernel of this interpreter, on a tiny prepared
dataset laid out as a pipeline working directory (``PIPELINE_DIR``): first it trains the three models
into a temporary ``OUT``, then it must reuse them from there, and then, with those runs copied into the
pipeline's ``results/runs``, load them from the pipeline instead. Any cell error fails the test.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from conftest import REPO, make_prepared

NOTEBOOK = REPO / "notebooks" / "mnist_normalization.ipynb"
PARAMETERS = ["DATASET", "EPOCHS", "TRAIN_SUBSET", "VAL_SIZE", "SEEDS", "THREADS", "OUT",
              "USE_PIPELINE_RESULTS", "PIPELINE_DIR"]  # fmt: skip
KERNEL = "normres-test"


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def parameters_index(nb: nbformat.NotebookNode) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def test_notebook_is_committed_without_outputs():
    nb = read_notebook()
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] for c in code), "strip the outputs before committing"
    assert all(c.execution_count is None for c in code), "strip the execution counts before committing"
    assert not any("execution" in c.metadata for c in nb.cells), "strip nbclient's timings before committing"


def test_parameters_cell_comes_first_and_names_every_parameter():
    nb = read_notebook()
    i = parameters_index(nb)
    assert nb.cells[i].cell_type == "code"
    assert all(c.cell_type == "markdown" for c in nb.cells[:i]), "the parameters must be the first code"
    for name in PARAMETERS:
        assert re.search(rf"^{name} = ", nb.cells[i].source, re.M), f"parameter {name} missing"


def run_notebook(kernel, reset: bool = False, **parameters) -> str:
    """Execute the notebook in ``kernel`` with ``parameters`` injected after its parameters cell
    (papermill's way); ``reset`` first empties the kernel's namespace (``%reset -f``), so a reused
    kernel sees the notebook as a fresh one would, minus the cost of importing torch again.

    Returns the text and Markdown of all outputs.
    """
    from nbclient import NotebookClient

    nb = read_notebook()
    injected = "\n".join(f"{name} = {value!r}" for name, value in parameters.items())
    nb.cells.insert(
        parameters_index(nb) + 1,
        nbformat.v4.new_code_cell(injected, metadata={"tags": ["injected-parameters"]}),
    )
    if reset:
        nb.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))
    NotebookClient(nb, km=kernel, timeout=300).execute()  # raises CellExecutionError on any error
    text = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            text.append(o.get("text", ""))
            text += [str(o.get("data", {}).get(k, "")) for k in ("text/plain", "text/markdown")]
    return "\n".join(text)


@pytest.fixture
def kernel(tmp_path, monkeypatch):
    """A kernel of this very interpreter, started where Jupyter would start it: the notebook's folder.

    Its kernelspec is written to a temporary folder found first through JUPYTER_PATH, for this test
    only: nothing is installed anywhere, and the kernels the user may have registered do not matter.
    A fresh clone's .venv (``make setup``) has ipykernel.
    """
    from ipykernel.kernelspec import write_kernel_spec
    from jupyter_client import AsyncKernelManager
    from jupyter_core.utils import run_sync

    write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    km = AsyncKernelManager(kernel_name=KERNEL)
    run_sync(km.start_kernel)(cwd=str(NOTEBOOK.parent))
    try:
        yield km
    finally:
        run_sync(km.shutdown_kernel)(now=True)


@pytest.mark.slow
def test_notebook_trains_then_loads_the_pipeline_results(tmp_path, kernel):
    pipeline = tmp_path / "pipeline"  # a Snakemake working directory with only its prepared data
    make_prepared(pipeline / "resources" / "fashion_mnist" / "data.pt", n_train=800, n_test=200)
    tiny = dict(DATASET="fashion_mnist", EPOCHS=1, TRAIN_SUBSET=512, VAL_SIZE=100, SEEDS=[0], THREADS=1,
                PIPELINE_DIR=str(pipeline))  # fmt: skip

    out = tmp_path / "out"
    text = run_notebook(kernel, **tiny, OUT=str(out), USE_PIPELINE_RESULTS=False)
    assert "Trained 3 of 3 runs in this notebook" in text
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(runs["norm"]) == ["bn", "gn", "ln"] and (runs["epochs"] == 1).all()
    assert runs["test_accuracy"].between(0, 1).all()
    figures = out / "figures"
    for png in (
        "test_loss_curves",
        "test_accuracy_curves",
        "misclassified/gn",
        "misclassified/ln",
        "misclassified/bn",
    ):
        assert (figures / f"{png}.png").stat().st_size > 0
    assert not (pipeline / "results").exists(), "the notebook wrote into the pipeline's folder"

    # Run again: the finished runs in OUT are reused, not retrained.
    models = {p: p.stat().st_mtime_ns for p in out.glob("runs/**/model.pt")}
    text = run_notebook(kernel, reset=True, **tiny, OUT=str(out), USE_PIPELINE_RESULTS=False)
    assert "Trained 0 of 3 runs in this notebook" in text
    assert len(models) == 3 and models == {p: p.stat().st_mtime_ns for p in out.glob("runs/**/model.pt")}

    # The same runs, now as the pipeline's (under its own study name): loaded, nothing trained.
    shutil.copytree(out / "runs" / "mnist", pipeline / "results" / "runs" / "cnn")
    out2 = tmp_path / "out2"
    text = run_notebook(kernel, reset=True, **tiny, OUT=str(out2), USE_PIPELINE_RESULTS=True)
    assert "Loaded all 3 runs from the pipeline's results" in text
    assert not (out2 / "runs").exists()
    loaded = pd.read_csv(out2 / "runs.csv")
    pd.testing.assert_series_equal(loaded["test_accuracy"], runs["test_accuracy"])
