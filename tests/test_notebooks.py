"""Every teaching notebook runs top to bottom (small sizes) and keeps its figures in the saved outputs."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _images(book) -> int:
    return sum("image/png" in out.get("data", {}) for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


def test_there_are_the_teaching_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    for topic in ("pooling_and_shrinkage", "blup_as_penalized_regression", "blup_vs_posterior",
                  "prediction_uncertainty", "batch_fitting"):
        assert any(topic in name for name in names), topic


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_figures(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    saved = nbformat.read(path, as_version=4)
    assert _images(saved) >= 1, "the committed notebook has no figure in its outputs"
    assert all(cell.execution_count for cell in saved.cells if cell.cell_type == "code"), \
        "the committed notebook has a code cell that was not run"
    monkeypatch.setenv("HIERPOOL_NOTEBOOK_QUICK", "1")
    book = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}).execute()
    assert _images(book) == _images(saved)
