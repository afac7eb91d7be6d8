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
#: factorization has enough work for OpenBLAS's threads to pay.
ONE_THREAD_MAX_SIZE = 1000

# threadpoolctl finds the loaded BLAS libraries by walking the process's shared objects, ~1.5 ms a time: a
# single AR(1) fit takes 20-50 ms, so the controller is kept while no module has been imported since (a new BLAS
# comes with a new module), and a block inside another on the same thread does nothing
_controller: list = [None, -1]  # (threadpoolctl controller, len(sys.modules) when it was made)
_inside = threading.local()


def _blas_controller():
    if _controller[1] != len(sys.modules):
        from threadpoolctl import ThreadpoolController

        _controller[0] = ThreadpoolController().select(user_api="blas")
        _controller[1] = len(sys.modules)
    return _controller[0]


@contextlib.contextmanager
def one_blas_thread(size: int = 0):
    """Limit BLAS (OpenBLAS, MKL, BLIS: every one loaded, NumPy's and SciPy's) to one thread inside the block.

    Parameters
    ----------
    size : int
        Rows of the largest dense matrix the block factors; above :data:`ONE_THREAD_MAX_SIZE` the
        limit is not applied.

    Yields
    ------
    None
        Inside the block BLAS runs on the calling thread.

    Notes
    -----
    ``threadpoolctl`` sets the BLAS libraries' thread count, which is process-wide: other Python
    threads' BLAS calls run single-threaded too while a host fit is inside the block.  The previous
    count is restored on exit.  A block inside another one of the same thread leaves the limit to it.
    """
    if size > ONE_THREAD_MAX_SIZE or getattr(_inside, "depth", 0):
        yield
        return
    _inside.depth = 1
    try:
        with _blas_controller().limit(limits=1):
            yield
    finally:
        _inside.depth = 0
