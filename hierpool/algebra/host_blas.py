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

#: Largest dense matrix (rows) of a model whose host fit runs BLAS on one thread: beyond it, a
#: factorization has enough work for OpenBLAS's threads to pay.
ONE_THREAD_MAX_SIZE = 1000


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
    count is restored on exit.
    """
    if size > ONE_THREAD_MAX_SIZE:
        yield
        return
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield
