"""XLA options for hierpool's large compiled programs (the NUTS chains, the batch fitter).

Those programs are compiled once per process and then run for well under a second
on small models, so on CPU their compile time is most of the wall time.  XLA's CPU
"fusion emitters" (the MLIR code generator for fused loops) cost more to compile
than the classic LLVM emitters they replace and buy nothing on these programs.
Measured on the project's 2-core VM (benchmarks/RESULTS.md): the sleepstudy NUTS
chain program compiles in 2.0 s instead of 3.4 s, and the 2,000-dataset batch fit
takes 2.4 s instead of 3.2 s, with the same run time and results equal to
rounding.  The closed-form engine (``hp.lmm``) keeps XLA's defaults: on InstEval
the classic emitters made its (compile-free) second fit slower.

With ``quick=True`` LLVM's optimization is off as well
(``xla_backend_optimization_level=0``) for programs that run for less time than
it takes: most of XLA's CPU compile time there is LLVM optimizing hundreds of
small kernels that each run for microseconds.  Used for ``hp.bayes``' NUTS
programs of small models (``hierpool.bayesian.nuts.quick_compile``; on sleepstudy the chain program compiles in ~1.4 s instead of ~2.0 s
and its four chains run in ~0.6 s instead of ~0.4 s; CPU time of the
compilation 1.7 s instead of 2.8 s, which also frees the second core for the
other programs) and for ``hp.fit_batch`` batches of up to ~5,000 sleepstudy-sized datasets (2,000:
~0.4 s less compilation, ~0.15 s more run time).  Large batches, and ``hp.bayes_batch``
beyond a few datasets (the same ``quick_compile`` rule as ``hp.bayes``), run long enough to keep
LLVM's optimization.  Quick programs are also
generated as one LLVM module, not split for parallel code generation
(``xla_cpu_parallel_codegen_split_count=1``): ``hp.bayes`` compiles its start and
chain programs side by side on the two cores, and unsplit they take less CPU time
(start program 0.28-0.34 s instead of 0.39-0.43 s); hp.bayes on sleepstudy 1.94
instead of 2.10 s (median of 7 alternating runs), fit_batch unchanged.

The options go to each program's own compilation (``Lowered.compile``); nothing
process-wide (``XLA_FLAGS``, ``jax.config``) is changed.

XLA compiles outside Python's GIL, so :func:`compile_in_background` lets a caller
trace its next program (Python) or run a compiled one while this one compiles.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import jax
import numpy as np

#: Options for CPU programs; other backends get XLA's defaults.
CPU_OPTIONS = {"xla_cpu_use_fusion_emitters": False}
#: Added for programs whose compile time outweighs their run time (``quick=True``).
CPU_QUICK_OPTIONS = {"xla_backend_optimization_level": 0, "xla_cpu_parallel_codegen_split_count": 1}


def compiler_options(platform: str | None = None, quick: bool = False) -> dict:
    """The ``compiler_options`` for a program that runs on ``platform`` (default: JAX's default backend).

    ``quick``: the program runs for less time than LLVM's optimization of it takes (a small model's NUTS chains).
    """
    platform = jax.default_backend() if platform is None else platform
    if platform != "cpu":
        return {}
    return {**CPU_OPTIONS, **CPU_QUICK_OPTIONS} if quick else dict(CPU_OPTIONS)


#: Per-evaluation work (flops, :func:`hierpool.algebra.system.evaluation_flops`) from which compiling
#: the closed form's criterion pays for itself: below it the fit is done on the host before XLA would
#: have compiled the program.  Chosen from ``benchmarks/host_or_compiled.py`` (benchmarks/RESULTS.md).
COMPILE_MIN_FLOPS = 1e9


def compile_pays(flops_per_evaluation: float) -> bool:
    """Whether a computation of this size should be compiled rather than run in NumPy on the host.

    "Compile only where compiling pays": a small model is fitted before XLA would
    have finished compiling its program.
    """
    return flops_per_evaluation >= COMPILE_MIN_FLOPS


_COMPILER = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hierpool-compile")


def compile_in_background(lowered, platform: str | None = None, quick: bool = False) -> Future:
    """Start compiling a ``jax.stages.Lowered`` with :func:`compiler_options`; the Future gives the executable."""
    return _COMPILER.submit(lowered.compile, compiler_options(platform, quick))


def shape_signature(tree) -> tuple:
    """What a compiled program depends on in its arguments: their tree structure and each leaf's shape and dtype.

    The key of hierpool's compiled-program caches (with the settings baked into the program).
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        (tuple(x.shape) if hasattr(x, "shape") else np.shape(x),
         np.dtype(x.dtype if hasattr(x, "dtype") else np.result_type(x)).name)
        for x in leaves)
