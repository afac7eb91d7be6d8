"""Every teaching notebook runs top to bottom (small sizes), checks its own claims, and keeps its figures.

The numbers and statements a notebook's text makes are computed by its code cells and checked by
``assert`` statements in them (with a message): an assert that fails makes the execution below fail.
Every notebook must keep at least one such cell, and its committed outputs must come from a run in
which they all passed.
"""

import ast
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def _images(book) -> int:
    return sum("image/png" in out.get("data", {})
               for cell in book.cells if cell.cell_type == "code" for out in cell.outputs)


def _python(source: str) -> str:
    """A code cell's source without IPython magics and shell escapes."""
    return "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))


def _asserts(cell) -> list[ast.Assert]:
    return [node for node in ast.walk(ast.parse(_python(cell.source))) if isinstance(node, ast.Assert)]


def test_there_are_the_teaching_notebooks():
    names = {p.stem for p in NOTEBOOKS}
    for topic in ("pooling_and_shrinkage", "blup_as_penalized_regression", "blup_vs_posterior",
                  "prediction_uncertainty", "batch_fitting", "binary_outcomes", "autocorrelated_trials",
                  "heritability_and_breeding_values", "disease_mapping"):
        assert any(topic in name for name in names), topic


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_checks_its_claims(path):
    nbformat = pytest.importorskip("nbformat")
    saved = nbformat.read(path, as_version=4)
    code = [cell for cell in saved.cells if cell.cell_type == "code"]
    checks = [node for cell in code for node in _asserts(cell)]
    assert checks, "the notebook has no assert cell: its claims are not checked"
    assert all(node.msg is not None for node in checks), "every assert should say what it checks"
    errors = [out for cell in code for out in cell.outputs if out.get("output_type") == "error"]
    assert not errors, f"the committed outputs hold an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"


def _execute(path: Path):
    """Run one notebook top to bottom in its own python3 kernel: (the executed notebook, the error or None)."""
    import nbclient
    import nbformat

    book = nbformat.read(path, as_version=4)
    try:
        # a failing assert cell raises CellExecutionError here
        nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}}).execute()
    except Exception as error:  # re-raised by the notebook's own test below
        return book, error
    return book, None


def _recorded_seconds(path: Path) -> float:
    """The committed run's time in its code cells (nbclient's timing metadata; 0 where there is none)."""
    from datetime import datetime

    seconds = 0.0
    for cell in json.loads(path.read_text())["cells"]:
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if start and end:
            elapsed = datetime.fromisoformat(end.rstrip("Z")) - datetime.fromisoformat(start.rstrip("Z"))
            seconds += elapsed.total_seconds()
    return seconds


@pytest.fixture(scope="module")
def executed():
    """Every notebook, run two at a time: each kernel is its own process, and most of a notebook's
    time is single-threaded (kernel start, imports, XLA compilation), so two kernels use the
    machine's two cores where one at a time leaves one idle.  The longest (by the committed run's
    cell times) start first: started last, one long notebook runs on alone after the others are done."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    longest_first = sorted(NOTEBOOKS, key=_recorded_seconds, reverse=True)
    with pytest.MonkeyPatch.context() as patch, ThreadPoolExecutor(max_workers=2) as pool:
        patch.setenv("HIERPOOL_NOTEBOOK_QUICK", "1")  # the kernels inherit it: fewer draws
        return dict(zip(longest_first, pool.map(_execute, longest_first)))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_and_shows_its_figures(path, executed):
    nbformat = pytest.importorskip("nbformat")
    saved = nbformat.read(path, as_version=4)
    assert _images(saved) >= 1, "the committed notebook has no figure in its outputs"
    assert all(cell.execution_count for cell in saved.cells if cell.cell_type == "code"), \
        "the committed notebook has a code cell that was not run"
    book, error = executed[path]
    if error is not None:
        raise error
    assert _images(book) == _images(saved)
