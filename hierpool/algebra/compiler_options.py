"""XLA options for hierpool's large compiled programs (the NUTS chains, the batch fitter), and their cache.

Those programs are compiled once per process and then run for well under a second
on small models, so on CPU their compile time is most of the wall time.  XLA's CPU
"fusion emitters" (the MLIR code generator for fused loops) cost more to compile
than the classic LLVM emitters they replace and buy nothing on these programs: the
sleepstudy NUTS chain program and the 2,000-dataset batch fit compile in less time,
with the same run time and results equal to rounding (measured in
benchmarks/RESULTS.md, "Bayesian engine, fourth session" and "Batch fitting, fourth
session").  The closed-form engine (``hp.lmm``) keeps XLA's defaults: on InstEval
the classic emitters made its (compile-free) second fit slower.

With ``quick=True`` LLVM's optimization is off as well
(``xla_backend_optimization_level=0``) for programs that run for less time than
it takes: most of XLA's CPU compile time there is LLVM optimizing hundreds of
small kernels that each run for microseconds.  Used for ``hp.bayes``' NUTS
programs of small models (``hierpool.bayesian.nuts.quick_compile``) and its start
program at any size (one evaluation of the potential per chain), which also
frees the second core for the other programs, and for ``hp.fit_batch`` batches of
up to ~5,000 sleepstudy-sized datasets.  Large batches, and ``hp.bayes_batch``
beyond a few datasets (the same ``quick_compile`` rule as ``hp.bayes``), run long
enough to keep LLVM's optimization.  Quick programs are also generated as one LLVM
module, not split for parallel code generation
(``xla_cpu_parallel_codegen_split_count=1``): ``hp.bayes`` compiles its start and
chain programs side by side on the two cores, and unsplit they take less CPU time;
``fit_batch`` is unchanged.  The timings are in benchmarks/RESULTS.md ("Bayesian
engine", fifth and sixth sessions; "Batch fitting, fifth session").

The options go to each program's own compilation (``Lowered.compile``); nothing
process-wide (``XLA_FLAGS``, ``jax.config``) is changed.

XLA compiles outside Python's GIL, so :func:`compile_in_background` lets a caller
trace its next program (Python) or run a compiled one while this one compiles.

Every compiled-program cache of hierpool (``hp.bayes``' NUTS programs, ``hp.fit_batch``'s
and ``hp.bayes_batch``'s chunk programs) is a :class:`ProgramCache`, keyed by
:func:`shape_signature` and the settings baked into the program: one bounded LRU
policy, so a long session fitting many shapes does not keep every executable alive.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from .jax_runtime import default_backend_is_cpu, jax

#: Options for CPU programs; other backends get XLA's defaults.
CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
#: Added for programs whose compile time outweighs their run time (``quick=True``).
CPU_QUICK_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_parallel_codegen_split_count": 1}


#: Options the installed XLA has refused as unknown (:func:`compile_lowered`): not passed again in this process.
UNKNOWN_OPTIONS: set[str] = set()
_UNKNOWN_OPTION = re.compile(r"No such compile option: '([^']+)'")


def compiler_options(platform: str | None = None, quick: bool = False) -> dict:
    """The ``compiler_options`` for a program that runs on ``platform`` (default: JAX's default backend), less
    those the installed XLA does not know (:data:`UNKNOWN_OPTIONS`).

    ``quick``: the program runs for less time than LLVM's optimization of it takes (a small model's NUTS chains).
    """
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        return {}
    options = {**CPU_OPTIONS, **CPU_QUICK_OPTIONS} if quick else dict(CPU_OPTIONS)
    return {name: value for name, value in options.items() if name not in UNKNOWN_OPTIONS}


def compile_lowered(lowered, platform: str | None = None, quick: bool = False):
    """``lowered.compile`` with :func:`compiler_options`; an option the installed XLA refuses as unknown is dropped
    (and remembered in :data:`UNKNOWN_OPTIONS`) and the program compiled without it.  XLA's debug options come and
    go between releases: jaxlib 0.11 no longer knows ``xla_cpu_use_fusion_emitters`` (its fusion emitters are the
    only ones left), and every compiled program failed with "No such compile option"."""
    while True:
        options = compiler_options(platform, quick)
        try:
            return lowered.compile(options)
        except Exception as error:  # JAX's runtime error type has changed names between releases
            unknown = _UNKNOWN_OPTION.search(str(error))
            if unknown is None or unknown.group(1) not in options:  # (programs compile on two threads at once)
                raise
            UNKNOWN_OPTIONS.add(unknown.group(1))


#: Per-evaluation work (flops, :func:`hierpool.algebra.system.evaluation_flops`) from which compiling
#: the closed form's criterion pays for itself: below it the fit is done on the host before XLA would
#: have compiled the program.  Chosen from ``benchmarks/host_or_compiled.py`` (benchmarks/RESULTS.md).
COMPILE_MIN_FLOPS = 1e9

#: Rows from which a fit on a CPU stays on the host whatever its work per evaluation.  Memory, not
#: time, decides there: the compiled path adds JAX's runtime and XLA's buffers to save part of a first
#: fit whose rows and cross-products are built the same way on both paths.  Set between InstEval's
#: 73,421 rows (its second fit needs the compiled program) and a 500,000-row crossed model, where the
#: compiled path's peak was above lme4's and the host's below (benchmarks/RESULTS.md, "Memory of the
#: 500,000-row fit, phase by phase" and "Large data on the host").  On an accelerator large fits compile;
#: ``Control(compile=True)`` compiles on a CPU too.
HOST_MIN_ROWS = 200_000


def compile_pays(flops_per_evaluation: float, rows: int = 0) -> bool:
    """Whether a fit of this size should be compiled rather than run in NumPy on the host.

    "Compile only where compiling pays": a small model (under :data:`COMPILE_MIN_FLOPS` per
    evaluation) is fitted before XLA would have finished compiling its program, and on a CPU
    a model with :data:`HOST_MIN_ROWS` rows or more stays on the host for its memory.
    """
    if flops_per_evaluation < COMPILE_MIN_FLOPS:
        return False
    return rows < HOST_MIN_ROWS or not default_backend_is_cpu()


_COMPILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hierpool-compile")


def compile_in_background(lowered, platform: str | None = None, quick: bool = False) -> Future:
    """Start compiling a ``jax.stages.Lowered`` (:func:`compile_lowered`); the Future gives the executable."""
    return _COMPILER.submit(compile_lowered, lowered, platform, quick)


def shape_signature(tree) -> tuple:
    """What a compiled program depends on in its arguments: their tree structure and each leaf's shape and dtype.

    The key of hierpool's compiled-program caches (with the settings baked into the program).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        (tuple(x.shape) if hasattr(x, "shape") else np.shape(x),
         np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x)).name)
        for x in leaves)


#: Compiled programs a :class:`ProgramCache` keeps by default (the most recently used).
PROGRAMS_KEPT = 8


class ProgramCache:
    """A small bounded LRU cache of compiled programs (or futures of them), shared by threads.

    :meth:`get` returns the value for ``key``, building it with ``build()`` on a miss;
    beyond ``size`` entries the least recently used is dropped (its executable is freed
    once no caller holds it).  ``build`` runs outside the lock: two threads missing the
    same key at once may both build it (the first stored wins), and a slow compilation
    never blocks another key's lookup.  A caller that needs several programs for one call
    holds them itself while it runs, so that eviction never makes one call compile twice.
    """

    def __init__(self, size: int = PROGRAMS_KEPT):
        if size < 1:
            raise ValueError(f"a ProgramCache keeps at least 1 program, got size={size}")
        self.size = size
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[], object]):
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = build()
        with self._lock:
            value = self._items.setdefault(key, value)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
