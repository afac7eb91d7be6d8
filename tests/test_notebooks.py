"""Every teaching notebook runs top to bottom (small sizes), checks its own claims, and keeps its figures.

The numbers and statements a notebook's text makes are computed by its code cells and checked by
``assert`` statements in them (with a message): an assert that fails makes the execution below fail.
Every notebook must keep at least one such cell, and its committed outputs must come from a run in
which they all passed.
"""

import ast
import contextlib
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


def _execute_each(paths: list[Path]) -> dict:
    """Run each notebook top to bottom, one after another in one python3 kernel: {path: (the executed notebook,
    the error or None)}.

    Each notebook starts from an empty namespace (IPython's ``%reset -f`` clears every name, its imports' too, so a
    notebook that leans on a name of another fails as it would alone); what they share is the process: the imports
    of JAX, NumPyro, ArviZ and matplotlib, and the programs XLA compiled for one, load once (nine kernels against one:
    benchmarks/RESULTS.md, fifty-third session).  A kernel that dies is replaced for the next notebook.
    """
    import nbclient
    import nbformat
    from jupyter_core.utils import run_sync

    results, manager = {}, None
    try:
        for path in paths:
            book = nbformat.read(path, as_version=4)
            book.cells.insert(0, nbformat.v4.new_code_cell("%reset -f"))  # removed again below
            if manager is None:
                manager = nbclient.NotebookClient(book, kernel_name="python3").create_kernel_manager()
            # given a manager, the client starts its kernel if none runs, and leaves it running
            client = nbclient.NotebookClient(book, km=manager, timeout=600, kernel_name="python3",
                                             resources={"metadata": {"path": str(path.parent)}})
            error = None
            try:
                client.execute()  # a failing assert cell raises CellExecutionError here
            except nbclient.exceptions.CellExecutionError as raised:  # re-raised by the notebook's own test below
                error = raised
            except Exception as raised:  # the kernel died or timed out: the next notebook gets a new one
                error = raised
                with contextlib.suppress(Exception):
                    run_sync(manager.shutdown_kernel)(now=True)
                manager = None
            finally:
                if client.kc is not None:
                    client.kc.stop_channels()
            book.cells.pop(0)
            results[path] = (book, error)
    finally:
        if manager is not None:
            run_sync(manager.shutdown_kernel)(now=True)
    return results


@pytest.fixture(scope="module")
def executed():
    """Every notebook, run in one kernel (:func:`_execute_each`).  The kernel inherits
    HIERPOOL_NOTEBOOK_QUICK=1: fewer draws."""
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HIERPOOL_NOTEBOOK_QUICK", "1")
        return _execute_each(NOTEBOOKS)


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
