"""Worker processes for the host paths of ``hp.fit_batch`` (GLMMs, several-term linear models, several-term AR(1)
models; the datasets it fits alone, its spatial datasets) and of ``hp.bayes_batch`` (its independence pass, a
Gaussian model's relmat and spatial datasets): chunks of datasets fitted (or sampled) on the other cores.

**Why processes.**  A host fit is NumPy on a chunk's stacked arrays: many operations, most of them small, and the
interpreter holds the GIL between them, so that a second thread adds little and a second process nearly doubles
the throughput (benchmarks/RESULTS.md, "Worker processes, and the class beyond the issue's models, seventeenth
session", measured there).  :func:`call` runs a chunk either here (one chunk at a time while workers run) or in an
idle worker.

**Why not multiprocessing.**  Its ``spawn`` and ``forkserver`` start methods run the parent's ``__main__`` script
again in every worker (a user's script without a ``__main__`` guard would fit its batch again there), and
``fork`` copies a process whose JAX threads may hold locks.  A worker here is ``python -P -c`` importing this
module: nothing of the user's runs in it, and for ``hp.fit_batch`` it loads NumPy and the host algebra, not JAX (the
searches it runs are importable without JAX: :mod:`hierpool.batch.glmm_search`, :mod:`hierpool.algebra.search.terms`,
:mod:`hierpool.algebra.search.ar1_systems`).  A single fit or sampler run whole (``hp.lmm``, ``hp.glmm``,
``hp.bayes``'s independence and exact samplers: :func:`hierpool.batch.fit.refit_values`,
:func:`hierpool.batch.fit_each.dataset_fit`, :func:`hierpool.batch.bayes_each.sample_summary`,
:func:`hierpool.batch.bayes_each.dataset_posterior`) imports JAX with its
modules: a worker loads it once, a fresh process's JAX (no thread of the parent's is copied), and holds it (its
memory measured in benchmarks/RESULTS.md, forty-fourth session) for the process's life.  Those runs are NumPy and
SciPy on the host, each dataset's numbers the same wherever it runs (tested bit for bit); ``hp.bayes``'s NUTS is
not sent (its draws in a worker differed from this process's).

**Protocol.**  Length-prefixed pickles on the worker's stdin and stdout (its own prints go to its stderr, the
parent's): the function (by reference) and its arguments in, ``("ok", result)``, ``("error", exception)`` or
``("unloadable", why)`` (a job the worker could not unpickle, which then runs here) out.

**Lifetime.** Workers start on first use (:func:`start`, by a batch large enough to pay for them) and stay for the
process's life, their start (the imports of NumPy and the host algebra) paid once; each exits when its stdin closes
(the parent's exit). A worker that dies has its chunk fitted here instead, with a warning.
``HIERPOOL_HOST_PROCESSES=0`` in the environment turns them off (chunks then run on threads only).
"""

from __future__ import annotations

import atexit
import importlib
import os
import pickle
import queue
import signal
import struct
import subprocess
import sys
import threading
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor

from ..algebra.host_allocator import raise_malloc_thresholds
from ..algebra.host_blas import one_blas_thread

#: The environment variable that turns worker processes off ("0").
SWITCH = "HIERPOOL_HOST_PROCESSES"
# run with ``-P``: no working directory first on the path, so that the parent's own path (PYTHONPATH, below) decides
# which hierpool and NumPy the worker imports
_COMMAND = "import sys; from hierpool.batch.host_processes import serve; serve(sys.argv[1:])"
_HEADER = struct.Struct("<Q")


def _send(stream, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _read_exactly(stream, size: int) -> bytes:
    """``size`` bytes from ``stream`` (a pipe may return fewer a read), or EOFError when it closes first."""
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _receive(stream):
    """The next message, or EOFError when the other end has closed."""
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return pickle.loads(_read_exactly(stream, size))


def serve(preload=()) -> None:
    """A worker's loop: import the modules ``preload`` (those of the functions it will run: imported before the
    first chunk arrives), then run each (function, arguments) received on stdin and send its outcome on stdout:
    ``("ok", result)``, ``("error", exception)`` (the worker's traceback added to it as a note), or
    ``("unloadable", message)`` for a job it could not unpickle (the caller then runs it itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the parent's to handle; the chunk in hand finishes
    inbox, outbox = os.fdopen(os.dup(0), "rb"), os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # prints of the worker's own go to stderr, not into the protocol
    for module in preload:
        importlib.import_module(module)
    raise_malloc_thresholds()  # as in the parent (hierpool.algebra.host_allocator)
    _send(outbox, "ready")
    while True:
        try:
            function, arguments = _receive(inbox)
        except EOFError:  # the parent has exited
            return
        except Exception as error:  # noqa: BLE001 - e.g. a function of the parent's __main__
            outcome = ("unloadable", f"{type(error).__name__}: {error}")
        else:
            try:
                outcome = ("ok", function(*arguments))
            except Exception as error:  # noqa: BLE001 - the caller re-raises it
                outcome = ("error", _portable(error))
        try:
            _send(outbox, outcome)
        except OSError:  # the parent has gone
            return
        except Exception as error:  # noqa: BLE001 - a result that cannot be pickled
            _send(outbox, ("error", RuntimeError(f"host worker: {type(error).__name__}: {error}")))


def _portable(error: Exception) -> Exception:
    """``error`` with the worker's traceback as a note, or, if it would not survive the trip to the parent (pickled
    and unpickled), a RuntimeError carrying its type, message and traceback."""
    text = "".join(traceback.format_exception(error))
    try:
        error.add_note(f"in a hierpool host worker process:\n{text}")
        pickle.loads(pickle.dumps(error, protocol=pickle.HIGHEST_PROTOCOL))
        return error
    except Exception:  # noqa: BLE001 - any failure of the round trip
        return RuntimeError(f"in a hierpool host worker process:\n{text}")


class _Lost(Exception):
    """A worker's pipe closed: the process has died."""


class _Worker:
    """One worker process; it joins the idle queue once it has started."""

    def __init__(self, preload):
        path = [entry or os.getcwd() for entry in sys.path]  # "" is the parent's working directory
        # JAX on the CPU: a worker's runs are host work, and on a GPU's machine its JAX would otherwise take the
        # device (and most of its memory) beside the parent's
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(path),
                   OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", JAX_PLATFORMS="cpu")
        self.process = subprocess.Popen([sys.executable, "-P", "-c", _COMMAND, *preload], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, env=env)
        self.alive = True
        threading.Thread(target=self._await_start, daemon=True).start()

    def _await_start(self) -> None:
        try:
            started = _receive(self.process.stdout) == "ready"
        except Exception:  # noqa: BLE001 - it could not start (its stderr says why)
            started = False
        if started:
            _IDLE.put(self)
        else:
            self.close()

    def run(self, message: bytes):
        """Send a pickled (function, arguments) and return the worker's (status, value); _Lost if it died."""
        try:
            self.process.stdin.write(_HEADER.pack(len(message)) + message)
            self.process.stdin.flush()
            return _receive(self.process.stdout)
        except (EOFError, OSError) as error:
            self.close()
            raise _Lost from error
        except BaseException:  # interrupted mid-message: the pipe's state is unknown
            self.close()
            raise

    def close(self) -> None:
        self.alive = False
        try:
            self.process.stdin.close()
        except OSError:
            pass


_LOCK = threading.Lock()
_WORKERS: list[_Worker] = []
_IDLE: queue.SimpleQueue = queue.SimpleQueue()
#: One chunk at a time runs in this process while workers exist: a second one would share its GIL.
_HERE = threading.Lock()


def enabled() -> bool:
    """Whether worker processes may be used: ``HIERPOOL_HOST_PROCESSES`` is not "0", and the interpreter is Python
    itself (a frozen application's executable would start the application again)."""
    return os.environ.get(SWITCH, "1") != "0" and not getattr(sys, "frozen", False)


#: Most worker processes: each holds NumPy and the host algebra's modules for the process's life.
MAX_WORKERS = 7


def worker_count(threads: int) -> int:
    """Workers for a batch run on ``threads`` threads: one thread's chunks run here, each other's in a worker, at
    most as many as this process's usable cores less one (its CPU affinity, not the host's count: a container's
    share), and :data:`MAX_WORKERS`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(threads, cores, MAX_WORKERS + 1) - 1)


def start(count: int, preload=()) -> None:
    """Have ``count`` worker processes running or starting (none when :func:`enabled` is false); a new one imports
    the modules ``preload`` before it takes a chunk."""
    if not enabled():
        return
    with _LOCK:
        _WORKERS[:] = [worker for worker in _WORKERS if worker.alive]
        while len(_WORKERS) < count:
            try:
                _WORKERS.append(_Worker(preload))
            except Exception:  # noqa: BLE001 - no process could be started (no executable, no fork): chunks run here
                return


def _has_workers() -> bool:
    with _LOCK:
        return any(worker.alive for worker in _WORKERS)


def running() -> bool:
    """Whether some worker process is running or starting: then :func:`call` runs one call at a time here (the
    others wait for a worker); with none it runs each call here at once, in its caller's thread."""
    return _has_workers()


def on_one_blas_thread(function, *arguments):
    """``function(*arguments)`` with BLAS on one thread: a worker's run beside the other processes'."""
    with one_blas_thread():
        return function(*arguments)


def whole_runs(items, job, *, threads: int, minimum: int, preload=(), allowed: bool = True):
    """Each item's ``function(*arguments)`` (``job(item)`` gives both; the function a module's, picklable), yielded in
    the items' order: from ``minimum`` items (and where ``allowed``) here and in worker processes, one a core of
    ``threads`` (:func:`worker_count`), every process's BLAS on one thread (OpenBLAS's idle threads spin, taking the
    others' cores); otherwise here, one after another, in the caller's thread.

    For whole single fits and samplers over datasets (``hp.fit_batch``'s datasets fitted alone and spatial datasets,
    ``hp.bayes_batch``'s host samplers).  ``allowed`` is false where a run needs the caller's frame on its stack (a
    formula that reads the caller's names: :func:`hierpool.spec.transforms.caller_names`), which neither a worker
    nor a pool thread has.  Threads run only where a worker runs: with none, :func:`call` would run them here at once,
    and one run's record of its warnings (``warnings.catch_warnings``, not thread-safe) would take another's."""
    items = list(items)
    workers = worker_count(threads) if allowed and len(items) >= minimum else 0
    if workers:  # the imports run in the workers while the first items run here
        start(workers, preload)
    if not (workers and running()):
        for item in items:
            function, arguments = job(item)
            yield function(*arguments)
        return

    def run(item):
        function, arguments = job(item)
        return call(on_one_blas_thread, function, *arguments)

    with ThreadPoolExecutor(max_workers=workers + 1) as pool, one_blas_thread():
        yield from pool.map(run, items)


def call(function, *arguments):
    """``function(*arguments)``: here if no chunk is running here, else in an idle worker (waiting for one that is
    starting or busy), else here after all.  Arguments that cannot be pickled, a job the worker cannot load, or a
    worker that dies on it leave the call to run here (a chunk that killed one worker is not sent to another);
    the function's own error is raised here.  Called from the threads of a batch's chunks."""
    if not _has_workers():
        return function(*arguments)
    message = None
    while True:
        if _HERE.acquire(blocking=False):
            try:
                return function(*arguments)
            finally:
                _HERE.release()
        try:
            worker = _IDLE.get(timeout=0.02)
        except queue.Empty:
            if _has_workers():
                continue
            break
        if not worker.alive:
            continue
        if message is None:
            try:
                message = pickle.dumps((function, arguments), protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001 - e.g. a function defined in a test: it runs here
                _IDLE.put(worker)
                break
        try:
            status, value = worker.run(message)
        except _Lost:
            warnings.warn("a hierpool host worker process died; its chunk runs in this process",
                          RuntimeWarning, stacklevel=2)
            break
        _IDLE.put(worker)
        if status == "ok":
            return value
        if status == "error":
            raise value
        break  # unloadable there
    with _HERE:
        return function(*arguments)


def _forget_after_fork() -> None:
    """In a forked child: the parent's workers are the parent's (their pipes shared): the child starts its own."""
    global _LOCK, _HERE, _IDLE
    _WORKERS.clear()
    _LOCK, _HERE, _IDLE = threading.Lock(), threading.Lock(), queue.SimpleQueue()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_after_fork)


@atexit.register
def _stop() -> None:
    with _LOCK:
        for worker in _WORKERS:
            worker.close()
        for worker in _WORKERS:
            try:
                worker.process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                worker.process.kill()
