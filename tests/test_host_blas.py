"""algebra.host_blas.one_blas_thread: BLAS on one thread inside the block, the count restored after it, a nested
block leaving the limit to the outer one, and a large model's block not limited."""

import numpy as np  # noqa: F401  (its BLAS loaded, for threadpoolctl to find)
from threadpoolctl import threadpool_info, threadpool_limits

from hierpool.algebra.host_blas import ONE_THREAD_MAX_SIZE, one_blas_thread


def _blas_threads() -> set:
    return {library["num_threads"] for library in threadpool_info() if library["user_api"] == "blas"}


def test_one_thread_inside_the_block_and_the_count_restored_after_it():
    with threadpool_limits(limits=2, user_api="blas"):  # the suite's own processes run one thread: set two
        assert _blas_threads() == {2}
        with one_blas_thread():
            assert _blas_threads() == {1}
            with one_blas_thread():
                assert _blas_threads() == {1}
            assert _blas_threads() == {1}  # the nested block's exit leaves the outer one's limit
        assert _blas_threads() == {2}
        with one_blas_thread(ONE_THREAD_MAX_SIZE + 1):
            assert _blas_threads() == {2}
        with one_blas_thread():
            assert _blas_threads() == {1}  # the kept controller, a second time
        assert _blas_threads() == {2}
