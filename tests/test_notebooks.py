"""Every notebook in notebooks/ executes top to bottom without an error."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    assert {p.stem for p in NOTEBOOKS} == {"quickstart", "weight_lifecycle", "training_to_serving",
                                           "benchmark"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_executes(path, tmp_path):
    book = nbformat.read(path, as_version=4)
    # Run in a scratch folder: figures the notebooks save must not land in the repository.
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in book.cells if cell.cell_type == "code"
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
