"""Run NUTS chains of a NumPyro model as two or three compiled programs.

NumPyro's ``MCMC`` driver runs initialization, step-size search and bookkeeping
as many small eager JAX calls; on a small model each compiles separately and
together they cost more than the sampling (seen on sleepstudy: 318 compilations,
most of the wall time; benchmarks/RESULTS.md, "Measurements the code cites").  Here
a chain's start (prior-median initialization, with its potential energy and
gradient, and the chain's run key) is one small ``jax.jit`` program, its whole
run (warm-up with step-size and mass-matrix adaptation, sampling, the draws
constrained) another, built on NumPyro's functional NUTS kernel
(:func:`numpyro.infer.hmc.hmc`) and run for each chain in a thread of its
own; a caller's compiled post-processing of all chains' draws, where it has one,
is a third.  Compilation is most of a small model's wall time, so the chain
program, the longest to compile, is submitted first and the others are lowered
while it compiles; short runs of small models compile with
:mod:`hierpool.algebra.compiler_options`' quick options (:func:`quick_compile`)."""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.hmc import hmc
from numpyro.infer.util import ParamInfo, constrain_fn, potential_energy

from ..algebra.compiler_options import ProgramCache, compile_in_background, shape_signature
from ..algebra.system import MixedModelSystem, program_values
from ..algebra.varying import varying_zero

#: Per-iteration statistics kept for ArviZ's sample_stats group (NumPyro field -> ArviZ name).
SAMPLE_STATS = {
    "diverging": "diverging",
    "energy": "energy",
    "num_steps": "n_steps",
    "accept_prob": "acceptance_rate",
    "step_size": "step_size",
    "lp": "lp",
}


def _central_value(site):
    """Where a chain starts, before jitter: the prior median where it has a closed form.

    Not NumPyro's ``init_to_median``: that draws from every prior, and drawing from
    LKJ (Beta variates, a rejection loop) made a small model's program much longer to compile
    (benchmarks/RESULTS.md, "Measurements the code cites").
    Correlation factors start at the identity; priors without a quantile function
    (and flat priors) at the centre of their unconstrained space (NumPyro's
    ``init_to_feasible``), so that no site needs a random draw: the jitter is the
    start's only randomness.
    """
    if site["type"] != "sample" or site["is_observed"]:
        return None
    fn = site["fn"]
    shape = fn.shape(site["kwargs"].get("sample_shape", ()))
    if fn.support is constraints.corr_cholesky:
        return jnp.broadcast_to(jnp.eye(fn.event_shape[-1]), shape)
    try:
        return jnp.broadcast_to(fn.icdf(jnp.asarray(0.5)), shape)
    except (NotImplementedError, ImportError, AttributeError, TypeError, ValueError):  # no closed-form quantile
        transform = biject_to(fn.support)
        return transform(jnp.zeros(transform.inverse_shape(shape)))


def _start(model, model_args, key, jitter: float = 1.0):
    """Unconstrained starting point: the central values plus uniform(-jitter, jitter) noise per chain.

    One uniform draw for all sites: each random draw is a threefry program of its
    own in the compiled code (eleven of them took much of the start program's compile time;
    benchmarks/RESULTS.md, "Measurements the code cites").
    """
    initialized = handlers.substitute(model, substitute_fn=_central_value)
    trace = handlers.trace(initialized).get_trace(*model_args)
    # each site's inverse bijection from this one trace (NumPyro's unconstrain_fn would trace the model again)
    unconstrained = {
        name: biject_to(site["fn"].support).inv(site["value"])
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    leaves, tree = jax.tree_util.tree_flatten(unconstrained)
    sizes = [int(np.size(x)) for x in leaves]
    noise = jax.random.uniform(key, (sum(sizes),), minval=-jitter, maxval=jitter)
    pieces = jnp.split(noise, np.cumsum(sizes)[:-1]) if leaves else []
    noisy = [x + piece.reshape(jnp.shape(x)) for x, piece in zip(leaves, pieces)]
    return jax.tree_util.tree_unflatten(tree, noisy)


#: Compiled (start, chain, finish) programs by model, settings and argument shapes (the last 8 used).
_PROGRAMS = ProgramCache()


class _Progress:
    """A tqdm bar over all chains' iterations, fed from inside the compiled loops every ~1%.

    The compiled program holds a reference to this object; each run gives it a fresh bar.
    """

    def __init__(self, iterations: int, chains: int):
        self.total = iterations * chains
        self.every = max(1, iterations // 100)
        self.chains = chains
        self.bar = None
        self.lock = threading.Lock()

    def start(self) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc=f"sampling {self.chains} chain(s)", unit="it", file=sys.stderr)

    def update(self, i) -> None:
        with self.lock:  # chains run in parallel threads
            if self.bar is None:
                return
            self.bar.update(min(self.every, self.total - self.bar.n))
            if self.bar.n >= self.total:
                self.bar.close()
                self.bar = None


class _Programs:
    """The compiled start and chain programs, and the post-processing program if any (compiling in the background)."""

    def __init__(self, start, chain, finish_future):
        self.start = start
        self.chain = chain
        self._finish_future = finish_future
        self._finish = None

    @property
    def finish(self):
        if self._finish is None:
            self._finish = self._finish_future.result()
            self._finish_future = None
        return self._finish


def _chain_keys(seed, chain):
    """(start key, run key) of one chain, derived inside the program: no eager PRNG calls (each a small compilation)."""
    return jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), chain))


def potential_function(bound):
    """``potential(z, args)``: the model's potential energy, whose gradient is one shared jitted value-and-gradient.

    NumPyro's kernels differentiate the potential where they use it; written as a
    ``custom_vjp`` around one jitted ``value_and_grad``, the potential is traced and
    differentiated once for every program given the same ``potential`` (the start
    and chain programs; the tracing saved is in benchmarks/RESULTS.md, "Bayesian engine, fifth
    session"), not once per use.
    """
    value_and_grad = jax.jit(jax.value_and_grad(lambda z, args: potential_energy(bound, args, {}, z)))

    @jax.custom_vjp
    def potential(z, args):
        return value_and_grad(z, args)[0]

    def forward(z, args):
        return value_and_grad(z, args)

    def backward(grad, cotangent):
        return jax.tree_util.tree_map(lambda g: cotangent * g, grad), None  # the data and priors are not differentiated

    potential.defvjp(forward, backward)
    return potential


def start_function(bound, potential):
    """``start(seed, chain, args) -> (ParamInfo, run key)``: a chain's starting point with its potential energy
    and gradient, and the key of its run.

    The start of :func:`chain_function`'s chains, as a program of its own: compiled beside
    the chain program, it takes the potential's first copy and the key derivation (two
    threefry instances, ~6% of the chain program) out of the chain program.
    ``potential``: :func:`potential_function` of ``bound``, shared with the chain program.
    """

    def start(seed, chain, args):
        key_start, key_run = _chain_keys(seed, chain)
        z = _start(bound, args, key_start)
        energy, grad = jax.value_and_grad(potential)(z, args)
        return ParamInfo(z, energy, grad), key_run

    return start


def _varying_with(chain, state):
    """``state`` with its float, bool and unsigned (key) leaves made to vary with ``chain`` (:mod:`~hierpool.algebra.varying`).

    Under ``jax.vmap`` over chains, the leaves of the starting state that do not vary with
    the chain (the identity mass matrix, the first step size) all vary after one
    iteration: started varying, the NUTS scan is traced once, to the same chains (adding a
    zero changes no value but a zero's sign); the tracing saved is in benchmarks/RESULTS.md,
    "Tracing bayes_batch's chains".  The signed-integer counters (iteration, adaptation window)
    stay shared: made to vary, the warm-up's branches on them would run as selects of
    both branches.  Outside ``vmap`` the additions are of a scalar zero.
    """
    zero = varying_zero(chain)

    def vary(leaf):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.signedinteger):
            return leaf
        if leaf.dtype == jnp.bool_:
            return leaf | zero.astype(bool)
        return leaf + zero.astype(leaf.dtype)

    return jax.tree_util.tree_map(vary, state)


def chain_function(bound, *, tune, draws, target_accept, max_tree_depth, dense_mass, progress=None, potential=None):
    """``one_chain(seed, chain, args, start=None) -> (draws, stats)``: one NUTS chain of ``bound(*args)``, pure and jittable.

    Warm-up (step size and mass matrix adaptation) then ``draws`` kept
    iterations; ``draws`` are the model's sample sites (constrained) and
    deterministic sites, each with a leading ``draws`` axis, ``stats`` the :data:`SAMPLE_STATS`
    fields, each with a leading ``draws`` axis.  The chain's keys are
    ``fold_in(PRNGKey(seed), chain)``: vmapping over ``chain`` (and ``args``)
    runs many chains, of one model or of many datasets, in one program.
    ``start``: the chain's :func:`start_function` output; computed in the program when None.
    ``potential``: the :func:`potential_function` of ``bound`` (made here when None).
    """
    total = tune + draws
    potential = potential_function(bound) if potential is None else potential

    def one_chain(seed, chain, args, start=None):
        if start is None:
            key_start, key_run = _chain_keys(seed, chain)
            init_params = _start(bound, args, key_start)
        else:
            init_params, key_run = start
        kernel_init, kernel_sample = hmc(potential_fn=lambda z: potential(z, args), algo="NUTS")
        state = kernel_init(
            init_params, num_warmup=tune, target_accept_prob=target_accept, max_tree_depth=max_tree_depth, rng_key=key_run,
            dense_mass=dense_mass,
        )
        state = _varying_with(chain, state)

        def step(state, i):
            state = kernel_sample(state)
            if progress is not None:
                jax.lax.cond(i % progress.every == 0, lambda: jax.debug.callback(progress.update, i), lambda: None)
            stats = {
                "diverging": state.diverging,
                "energy": state.energy,
                "num_steps": state.num_steps,
                "accept_prob": state.accept_prob,
                "step_size": state.adapt_state.step_size,
                "lp": -state.potential_energy,
            }
            return state, (constrain_fn(bound, args, {}, state.z, return_deterministic=True), stats)

        _, (values, stats) = jax.lax.scan(step, state, jnp.arange(total))
        return jax.tree_util.tree_map(lambda x: x[tune:], (values, stats))

    return one_chain


#: Compile without LLVM's optimization (``compiler_options(quick=True)``) when the model's arrays
#: (a mixed-model system counted as the values its program reads: ``algebra.system.program_values``)
#: times the iterations of all chains are at most this many values: below it the chains run for
#: less time than LLVM takes to optimize their program, so skipping the optimization shortens the
#: fit (sleepstudy's one-term collapsed model, ~200 values; a one-term model with 85 levels, ~350);
#: a one-term model with 200 levels x 2 coefficients (~2,000 values) ties, and unoptimized code
#: loses beyond (sleepstudy's full model, ~1,300 values; 1,000 levels; a crossed 3,000-row model, counted
#: then with all its pair products).
#: The timings (4 chains x 2000 iterations) are in benchmarks/RESULTS.md, "Measurements the code
#: cites" and "Bayesian engine, fifth session".
QUICK_COMPILE_MAX_WORK = 8e6

#: The post-processing program runs once, one draw of (beta, b) per kept draw: one factorization,
#: where each chain iteration evaluates the potential's value and gradient at several leapfrog
#: steps.  Its work is counted as a quarter of a chain iteration's per draw, so it is compiled without
#: LLVM's optimization for somewhat larger models than the chains (Penicillin's crossed collapsed
#: model, ~4,300 values x 4 chains x 1,000 draws when all its pair products were counted, 869 now; timed
#: in benchmarks/RESULTS.md, "Batch fitting and the Bayesian engine, like for like — 2026-12-01 (second
#: session, quiet)").
FINISH_WORK_PER_DRAW = 0.25


def quick_compile(model_args, chains: int, iterations: int, extra_values: int = 0) -> bool:
    """Whether the chains are short enough that compiling without LLVM's optimization pays (see QUICK_COMPILE_MAX_WORK).

    A model's cross-products count as the values its program reads (``algebra.system.program_values``:
    a small crossed model's dense coupling, not its pair products); ``extra_values`` are read besides
    the arguments (a GLMM's dense mass matrix: :func:`sample_nuts`).
    """
    leaves = jax.tree_util.tree_leaves(model_args, is_leaf=lambda leaf: isinstance(leaf, MixedModelSystem))
    values = sum(program_values(leaf) if isinstance(leaf, MixedModelSystem) else int(np.size(leaf)) for leaf in leaves)
    return (values + extra_values) * chains * iterations <= QUICK_COMPILE_MAX_WORK


def _build_programs(
    model, static, model_args, chains, tune, draws, target_accept, max_tree_depth, dense_mass, postprocess, progress,
    extra_values=0,
):
    bound = partial(model, **dict(static))
    potential = potential_function(bound)
    one_chain = chain_function(bound, tune=tune, draws=draws, target_accept=target_accept,
                               max_tree_depth=max_tree_depth, dense_mass=dense_mass, progress=progress,
                               potential=potential)

    def finish(values, seed, args):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), chains)  # not any chain's key
        flat = jax.tree_util.tree_map(lambda x: x.reshape((chains * draws,) + x.shape[2:]), values)
        out = postprocess(flat, key, *args)
        return jax.tree_util.tree_map(lambda x: x.reshape((chains, draws) + x.shape[1:]), out)

    seed, chain = np.uint32(0), np.int32(0)
    quick = quick_compile(model_args, chains, tune + draws, extra_values)
    # XLA compiles outside the GIL: the chain program, the longest to compile, is lowered and compiling
    # first; the start (and finish) programs are lowered while it compiles and compile beside it.  The start
    # program evaluates the potential once per chain, so LLVM's optimization of it never pays: always quick,
    # which also leaves more of the second core to the chain program's compilation
    start_traced = jax.jit(start_function(bound, potential)).trace(seed, chain, model_args)
    chain_lowered = jax.jit(one_chain).lower(seed, chain, model_args, start_traced.out_info)
    chain_future = compile_in_background(chain_lowered, quick=quick)
    start_future = compile_in_background(start_traced.lower(), quick=True)
    finish_future = None
    if postprocess is not None:
        stacked = jax.tree_util.tree_map(
            lambda s: jax.ShapeDtypeStruct((chains,) + s.shape, s.dtype), chain_lowered.out_info[0]
        )
        finish_quick = quick_compile(model_args, chains, int(draws * FINISH_WORK_PER_DRAW))
        finish_future = compile_in_background(jax.jit(finish).lower(stacked, seed, model_args), quick=finish_quick)
    return _Programs(start_future.result(), chain_future.result(), finish_future)


def sample_nuts(
    model,
    model_args: tuple,
    *,
    static: tuple = (),
    chains: int,
    tune: int,
    draws: int,
    seed: int,
    target_accept: float = 0.8,
    max_tree_depth: int = 10,
    dense_mass: bool = False,
    postprocess=None,
    progress: bool = False,
    mass_dimension: int = 0,
):
    """Run ``chains`` NUTS chains of ``model(*model_args, **dict(static))``.

    Parameters
    ----------
    model : callable
        A NumPyro model (a module-level function: it keys the program cache).
    model_args : tuple
        Its array arguments, priors included (a pytree: traced, not baked into the program).
    static : tuple of (name, value)
        Hashable keyword arguments fixed at compile time (shapes, term widths).
    chains, tune, draws, seed : int
    target_accept : float
        Dual-averaging target acceptance probability.
    max_tree_depth : int
    dense_mass : bool
        Adapt a dense mass matrix (worth it for a few correlated parameters, such as
        the collapsed sampler's variance parameters) instead of a diagonal one.
    postprocess : callable, optional
        ``postprocess(constrained_draws, key, *model_args)`` -> pytree, applied to
        the constrained draws (flattened over chains and draws) in a second compiled
        program; its output is returned instead of the draws.  Hashable (it keys the cache).
        Without it there is no third program: work on the draws that is cheap on the
        host is best done there, after sampling, rather than compiled.
    progress : bool
        Show a progress bar.
    mass_dimension : int
        With ``dense_mass``, the number d of sampled coefficients, whose d x d mass matrix then counts
        among the values the chain program reads when deciding whether to compile it quick
        (:func:`quick_compile`): each leapfrog step reads it.  The full GLMM passes it (it samples every
        effect with a dense mass, which unoptimized code pays for at every step); 0, the default,
        counts nothing (the collapsed sampler's few variance parameters).

    Returns
    -------
    (draws, stats)
        ``draws``: dict of constrained draws shaped (chain, draw, ...) (or the
        postprocess output); ``stats``: the ``SAMPLE_STATS`` per chain and draw.

    Notes
    -----
    The compiled programs are cached (the last 8) by model, static arguments,
    settings and the shapes of ``model_args``: a second fit of a model of the same
    shape (another data set, other prior values) in the same process does not compile.
    """
    cache_key = (model, static, chains, tune, draws, target_accept, max_tree_depth, dense_mass, postprocess, progress,
                 shape_signature(model_args), mass_dimension)
    extra_values = mass_dimension**2 if dense_mass else 0

    def build():
        bar = _Progress(tune + draws, chains) if progress else None
        return _build_programs(
            model, static, model_args, chains, tune, draws, target_accept, max_tree_depth, dense_mass, postprocess, bar,
            extra_values,
        ), bar

    programs, bar = _PROGRAMS.get(cache_key, build)
    seed = np.uint32(seed % 2**32)
    if bar is not None:
        bar.start()
    workers = max(1, min(chains, os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # independent chains run side by side (one core each)
        def run(c):
            chain = np.int32(c)
            return jax.device_get(programs.chain(seed, chain, model_args, programs.start(seed, chain, model_args)))

        per_chain = list(pool.map(run, range(chains)))
    values = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[vc for vc, _ in per_chain])
    stats = jax.tree_util.tree_map(lambda *xs: np.stack(xs), *[st for _, st in per_chain])
    out = values if postprocess is None else jax.device_get(programs.finish(values, seed, model_args))
    return out, {SAMPLE_STATS[name]: value for name, value in stats.items()}
