"""algebra.host_blas.one_blas_thread: BLAS on one thread inside the block, the count restored after it, a nested
block leaving the limit to the outer one, a large model's block not limited, and blocks on two threads."""

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
            assert _blas_threads() == {1}  # a block after the last one closed
        assert _blas_threads() == {2}


def test_blocks_on_two_threads_hold_the_limit_until_the_last_one_leaves():
    """A enters, B enters, A leaves (B still inside: one thread), B leaves (the count from before A: two).  Each
    block restoring what it found would leave B unlimited, then the process at one thread for good."""
    import threading

    steps = {name: threading.Event() for name in ("a_in", "b_in", "a_out")}
    seen = {}

    def first():
        with one_blas_thread():
            steps["a_in"].set()
            steps["b_in"].wait(10)
        steps["a_out"].set()

    def second():
        steps["a_in"].wait(10)
        with one_blas_thread():
            steps["b_in"].set()
            steps["a_out"].wait(10)
            seen["inside b after a left"] = _blas_threads()

    with threadpool_limits(limits=2, user_api="blas"):
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        seen["after both"] = _blas_threads()
    assert seen == {"inside b after a left": {1}, "after both": {2}}
