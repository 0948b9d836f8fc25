"""Every chapter notebook as a reader on Colab gets it: the ``.ipynb`` alone in an empty
folder, with no ``../shared`` data and no repository around it (``$MEDIT_DATA`` points at
an empty folder, so the package cannot find the repository's data either). The pages must
run top to bottom on what the package ships (built-in facts, results JSON). The run uses
the pages' reduced setting (``MEDIT_QUICK=1``, ``medit_lite.quick``): fewer records and
samples in the cells that edit many; the book build runs the full pages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb"))

pytestmark = pytest.mark.book


def execute_alone(notebook: Path, folder: Path):
    """Execute ``notebook`` as a copy in ``folder`` with no data folder; returns the
    executed notebook (nbclient raises CellExecutionError on the first failing cell)."""
    import nbformat
    from nbclient import NotebookClient

    empty = folder / "no_data"
    empty.mkdir()
    copy = folder / notebook.name
    copy.write_bytes(notebook.read_bytes())
    nb = nbformat.read(copy, as_version=4)
    env = {"MEDIT_DATA": str(empty), "MEDIT_QUICK": "1", "MEDIT_QUIET": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(
            nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(folder)}}
        )
        return client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_no_shared_data_and_no_repository(notebook, tmp_path):
    executed = execute_alone(notebook, tmp_path)
    outputs = [o for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    # the page's figures were drawn from what the package ships
    assert any("image/png" in o.get("data", {}) for o in outputs), notebook.name


def test_model_name_switches_the_model_of_a_page(make_tiny, tmp_path):
    """``MODEL_NAME`` in a page's first cell is all a reader changes to run the page on
    another model: here a tiny random Llama saved to disk runs chapter 5's overview page
    (a ROME edit, its probability bars and the page's own checks)."""
    import nbformat

    from medit_lite.models import cache_dir

    # a fixed folder: the statistics ROME computes for the model are cached under its name
    folder = cache_dir() / "test-models" / "tiny-llama"
    if not (folder / "config.json").exists():
        tiny = make_tiny("llama", layers=4, seed=0)
        tiny.model.save_pretrained(folder)
        tiny.tokenizer.save_pretrained(folder)
    page = ROOT / "chapters" / "05_applications.ipynb"
    nb = nbformat.read(page, as_version=4)
    switched = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and "MODEL_NAME = None" in cell.source:
            cell.source = cell.source.replace("MODEL_NAME = None", f"MODEL_NAME = {str(folder)!r}")
            switched += 1
    assert switched == 1
    run = tmp_path / "run"
    run.mkdir()
    nbformat.write(nb, run / page.name)
    executed = execute_alone(run / page.name, run)
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for c in executed.cells if c.cell_type == "code" for o in c.get("outputs", [])
    )
    assert "tiny-llama" in text and "layers=4" in text, text[:2000]
