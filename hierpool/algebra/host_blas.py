"""BLAS on the calling thread while the host evaluates a model's criterion many times.

The host algebra's matrices are small (tens to a few hundred rows), and a fit factors them
hundreds of times.  OpenBLAS threads such calls, and on a machine whose cores are shared its
worker threads, once woken, spin and sleep between calls, so that some small factorizations take
hundreds of times their arithmetic (measured on a three-term GLMM in benchmarks/RESULTS.md, "GLMMs
on the host").
:mod:`hierpool.algebra.linalg` keeps its own products below OpenBLAS's threading threshold; this
context covers what it does not reach (LAPACK factorizations, SciPy's optimizers).
"""

from __future__ import annotations

import contextlib
import sys
import threading

#: Largest dense matrix (rows) of a model whose host fit runs BLAS on one thread: beyond it, a
#: factorization or product has enough work for OpenBLAS's threads to pay.
ONE_THREAD_MAX_SIZE = 1000

# threadpoolctl finds the loaded BLAS libraries by walking the process's shared objects, ~1.5 ms a time: a
# single AR(1) fit takes 20-50 ms, so the controller is kept while no module has been imported since (a new BLAS
# comes with a new module)
_controller: list = [None, -1]  # (threadpoolctl controller, len(sys.modules) when it was made)
# the limit is process-wide: the first block in (of any thread) sets it and the last one out restores the count
# from before the first, so that one thread's exit does not lift it under another's block, nor a late exit
# restore a count that was itself the limit
_lock = threading.Lock()
_held: dict = {"blocks": 0, "limit": None}


def _blas_controller():
    if _controller[1] != len(sys.modules):
        from threadpoolctl import ThreadpoolController

        _controller[0] = ThreadpoolController().select(user_api="blas")
        _controller[1] = len(sys.modules)
    return _controller[0]


def _release_openblas():
    """threadpoolctl (3.8) lets only the thread that last set OpenBLAS's count set it again until released: the
    last block out need not run on the thread that set the limit."""
    try:
        from threadpoolctl import OpenBLASController

        OpenBLASController.clear_controlling_thread(force=True)
    except (ImportError, AttributeError, TypeError):  # an older threadpoolctl: no such rule
        pass


@contextlib.contextmanager
def one_blas_thread(size: int = 0):
    """Limit BLAS (OpenBLAS, MKL, BLIS: every one loaded, NumPy's and SciPy's) to one thread inside the block.

    Parameters
    ----------
    size : int
        Rows of the largest dense matrix the block factors or multiplies (``hp.lmm``'s AR(1) and GLS fits
        pass the data's rows: their products over the whitened rows are their largest); above
        :data:`ONE_THREAD_MAX_SIZE` the limit is not applied.

    Yields
    ------
    None
        Inside the block BLAS runs on the calling thread.

    Notes
    -----
    ``threadpoolctl`` sets the BLAS libraries' thread count, which is process-wide: other Python
    threads' BLAS calls run single-threaded too while any thread is inside a block.  The first block
    in sets the limit and the last one out restores the count from before it, whichever threads
    they run on.
    """
    if size > ONE_THREAD_MAX_SIZE:
        yield
        return
    with _lock:
        if _held["blocks"] == 0:
            _release_openblas()
            _held["limit"] = _blas_controller().limit(limits=1)
            _release_openblas()
        _held["blocks"] += 1
    try:
        yield
    finally:
        with _lock:
            _held["blocks"] -= 1
            if _held["blocks"] == 0:
                _release_openblas()
                _held["limit"].restore_original_limits()
                _release_openblas()
