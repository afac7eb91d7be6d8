"""PIRLS and the Laplace approximation as one compiled program: :func:`hierpool.algebra.laplace.conditional_mode`
with every step inside XLA.

The steps are the host's (:mod:`hierpool.algebra.laplace`): Newton's weights and working
residual (:func:`~hierpool.algebra.laplace.newton_working`), one weighted Henderson solve
(:func:`hierpool.algebra.henderson.point_estimates`) on the system refilled in the program
(:func:`hierpool.algebra.system.fill_in_program`, the pattern found once on the host), step
halving while the penalized deviance rises, a solve that is not finite neither halved nor followed
(:func:`~hierpool.algebra.laplace.solve_failed`; its step count is then the cap), and at the mode
the log-determinant with the weights there.  A glmer fit evaluates the criterion hundreds of times,
each a few PIRLS steps on small arrays, where the host's per-operation overhead is most of the
time; in one program a step costs what its arithmetic costs.

The loops are ``lax.while_loop``: the program is compiled once per design shape and family, and
``theta``, ``beta`` and the starting ``u`` are its arguments.
"""

from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from ..spec.design import Design
from .compiler_options import ProgramCache, compile_in_background, shape_signature
from .criterion import objective_parts
from .family import Family
from .henderson import effects, point_estimates, prediction_covariance
from .jax_runtime import jax, jnp, pytree_dataclass
from .laplace import (
    PIRLS_MAX_HALVINGS,
    PIRLS_MAX_STEPS,
    PIRLS_TOL,
    ConditionalMode,
    newton_working,
    penalized_deviance,
    pirls_converged,
    saturated_deviance,
    solve_failed,
    step_rises,
)
from .laplace_gradient import laplace_gradient, leverages, rows_random_part
from .linalg import theta_to_factors
from .system import SystemPattern, fill_in_program
from .varying import varying_zero


@pytree_dataclass
@dataclass(frozen=True)
class ProgramData:
    """A GLMM's data as the program's arguments: the response, trials, offset, X and each term's rows."""

    y: jax.Array
    trials: jax.Array
    offset: jax.Array
    X: jax.Array
    term_rows: tuple  # per term: (level index per row, row values (n, k))
    pattern: SystemPattern  # of the working design (X in it when joint)


def program_data(design: Design, pattern: SystemPattern) -> ProgramData:
    """The arrays of ``design`` and the working design's ``pattern``, on the device (copied once)."""
    put = jax.device_put
    return ProgramData(
        y=put(design.y), trials=put(design.row_weights), offset=put(design.offset), X=put(design.X),
        term_rows=tuple((put(t.index.astype(np.int32)), put(t.z)) for t in design.terms),
        pattern=jax.tree_util.tree_map(put, pattern),
    )


def _at(family: Family, data: ProgramData, factors, beta, u):
    """(eta, mu, penalized deviance) at (beta, u)."""
    eta = data.offset + data.X @ beta + rows_random_part(data.term_rows, effects(factors, u))
    mu = family.link.inverse(eta)
    return eta, mu, penalized_deviance(family, data.y, data.trials, mu, u)


def _conditional_mode(theta, beta, u, shape, saturated, data: ProgramData, family: Family, joint: bool, tol: float,
                      max_steps: int, max_halvings: int, logdet_at=None):
    if family.name == "negative_binomial":  # the shape is an argument: one program for every value of it
        family = dataclasses.replace(family, shape=shape)
    factors = theta_to_factors(theta, data.pattern.layout.ks[: len(data.term_rows)])
    eta, mu, deviance = _at(family, data, factors, beta, u)

    def step(state):
        u, beta, eta, mu, deviance, steps, _ = state
        weights, residual = newton_working(family, data.y, eta, data.trials)
        fixed = data.offset + data.X @ beta
        response = (eta - data.offset if joint else eta - fixed) + residual
        solved_beta, solved_u, _, _ = point_estimates(theta, fill_in_program(data.pattern, weights, response))
        new_beta = solved_beta if joint else beta
        new_u = tuple(solved_u)
        failed = solve_failed(new_u, new_beta if joint else None)  # not halved, and the loop ends (the host's rule)

        def halve(inner):
            trial_u, trial_beta, _, _, _, halvings = inner
            trial_u = tuple(0.5 * (a + c) for a, c in zip(u, trial_u))
            trial_beta = 0.5 * (beta + trial_beta)
            return (trial_u, trial_beta, *_at(family, data, factors, trial_beta, trial_u), halvings + 1)

        def rises(inner):
            return step_rises(inner[4], deviance) & (inner[5] < max_halvings) & ~failed

        trial = (new_u, new_beta, *_at(family, data, factors, new_beta, new_u), steps * 0)
        new_u, new_beta, new_eta, new_mu, new_deviance, _ = jax.lax.while_loop(rises, halve, trial)
        converged = pirls_converged(deviance, new_deviance, tol)
        # a failed solve ends the loop as the host's does, by the step count (no carry added to the loop's state)
        return new_u, new_beta, new_eta, new_mu, new_deviance, jnp.where(failed, max_steps, steps + 1), converged

    def going(state):
        return (state[5] < max_steps) & ~state[6]

    # the counter and flag are computed from the deviance, not constants: under vmap each carry then varies from
    # the start, and the body (the halving loop's with it) is traced once (the varying module)
    zero = varying_zero(deviance)
    state = (tuple(u), beta, eta, mu, deviance, zero, zero != 0)
    u, beta, eta, mu, deviance, steps, converged = jax.lax.while_loop(going, step, state)
    _, weights, _ = family.working(data.y, eta, data.trials)
    # the log-determinant with the weights at the mode: Z's system only (X's block, when present, has no effect
    # on log |L_Z|, which is the factor of the random-effect columns eliminated first)
    if logdet_at is None:
        fixed = data.offset + data.X @ beta
        logdet = point_estimates(theta, fill_in_program(data.pattern, weights, eta - fixed))[3]
    else:  # the caller's (with its gradient)
        logdet = logdet_at(weights)
    # -2 log p(y | mu) = the deviance + -2 log p(y | y) (``saturated``, from the host): no log Gamma in the program
    squared_u = sum(jnp.sum(jnp.square(x)) for x in u)
    log_likelihood = -0.5 * (deviance - squared_u + saturated)
    return dict(u=u, b=effects(factors, u), beta=beta, eta=eta, mu=mu, working_weights=weights,
                log_likelihood=log_likelihood, logdet=logdet, laplace=deviance + saturated + logdet,
                steps=steps, converged=converged)


#: The compiled PIRLS programs of this process (:class:`~hierpool.algebra.compiler_options.ProgramCache`).
PROGRAMS = ProgramCache()


def compile_conditional_mode(data: ProgramData, family: Family, joint: bool, tol: float = PIRLS_TOL,
                             quick: bool = False) -> Future:
    """Start compiling ``(theta, beta, u, data) -> mode`` for ``data``'s shapes and ``family`` (cached): a Future.

    ``quick`` compiles without LLVM's optimization (:mod:`hierpool.algebra.compiler_options`): a fit
    runs the program for about as long as the optimization would take.
    """
    layout = data.pattern.layout
    u = tuple(jax.ShapeDtypeStruct((ell, k), np.float64) for ell, k in zip(layout.n_levels, layout.ks))
    theta = jax.ShapeDtypeStruct((layout.n_theta,), np.float64)
    beta = jax.ShapeDtypeStruct((data.X.shape[1],), np.float64)
    scalar = jax.ShapeDtypeStruct((), np.float64)
    family = dataclasses.replace(family, shape=None)  # an argument of the program (negative binomial)
    key = (shape_signature(data), family, joint, tol, quick)

    def build():
        program = jax.jit(functools.partial(_conditional_mode, family=family, joint=joint, tol=tol,
                                            max_steps=PIRLS_MAX_STEPS, max_halvings=PIRLS_MAX_HALVINGS))
        return compile_in_background(program.lower(theta, beta, u, scalar, scalar, data), quick=quick)

    return PROGRAMS.get(key, build)


def conditional_mode_in_program(theta, beta, design: Design, family: Family, data: ProgramData, *,
                                joint: bool = False, start_u=None, tol: float = PIRLS_TOL,
                                saturated: float | None = None) -> ConditionalMode:
    """:func:`hierpool.algebra.laplace.conditional_mode` in the compiled program.

    ``data`` is :func:`program_data` of ``design`` with the pattern of its working design
    (:func:`hierpool.algebra.laplace.pirls_patterns`, ``joint`` as here); ``saturated`` is
    :func:`~hierpool.algebra.laplace.saturated_deviance` (computed when None).  Only where
    :func:`~hierpool.algebra.laplace.deviance_gives_likelihood` holds.
    """
    if saturated is None:
        saturated = saturated_deviance(design, family)
    if start_u is None:
        start_u = tuple(np.zeros((t.n_levels, t.k)) for t in design.terms)
    program = compile_conditional_mode(data, family, joint, tol).result()
    out = jax.device_get(program(np.asarray(theta, dtype=float), np.asarray(beta, dtype=float).reshape(-1),
                                 tuple(np.asarray(x, dtype=float) for x in start_u),
                                 np.float64(1.0 if family.shape is None else family.shape),
                                 np.float64(saturated), data))
    return _as_mode(out)


def _as_mode(out: dict) -> ConditionalMode:
    return ConditionalMode(
        u=tuple(out["u"]), b=tuple(out["b"]), beta=out["beta"], eta=out["eta"], mu=out["mu"],
        working_weights=out["working_weights"], log_likelihood=float(out["log_likelihood"]),
        logdet=float(out["logdet"]), laplace=float(out["laplace"]), steps=int(out["steps"]),
        converged=bool(out["converged"]),
    )


# --- the gradient of the Laplace criterion in (theta, beta) (:mod:`hierpool.algebra.laplace_gradient`) ----------

def _working_system(data: ProgramData, weights):
    """The working system at ``weights`` with a response of ones: log |H| and H^-1 do not read the response
    (and a zero one would make the adjoint's penalized RSS zero)."""
    return fill_in_program(data.pattern, weights, jnp.ones_like(weights))


def _gradient(theta, mode, family: Family, data: ProgramData, system, logdet_gradient):
    """:func:`hierpool.algebra.laplace_gradient.laplace_gradient` in the program, on the working ``system`` at
    the mode's weights, with log |H|'s gradient in theta there (reverse mode through the linear mixed
    model's criterion)."""
    layout = data.pattern.layout
    u = jax.lax.stop_gradient(tuple(mode["u"]))
    eta = jax.lax.stop_gradient(mode["eta"])
    leverage = leverages(theta, data.term_rows, prediction_covariance(theta, system), layout.n_levels, layout.ks)

    def solve(response, weights):
        return point_estimates(theta, fill_in_program(data.pattern, weights, response))[1]

    return laplace_gradient(theta, family, data.y, data.trials, data.X, data.term_rows, u, eta, leverage, solve,
                            logdet_gradient)


def _value_and_gradient(theta, beta, u, shape, saturated, data: ProgramData, family: Family, tol: float,
                        max_steps: int, max_halvings: int):
    held = {}

    def logdet_at(weights):  # log |H| at the mode's weights, with its theta-gradient, computed once
        held["system"] = system = _working_system(data, jax.lax.stop_gradient(weights))
        value, held["gradient"] = jax.value_and_grad(lambda t: objective_parts(t, system).logdet_lz)(theta)
        return value

    mode = _conditional_mode(theta, beta, u, shape, saturated, data, family, False, tol, max_steps, max_halvings,
                             logdet_at)
    if family.name == "negative_binomial":
        family = dataclasses.replace(family, shape=shape)
    return mode, _gradient(theta, mode, family, data, held["system"], held["gradient"])


def laplace_value_and_gradient(theta, beta, saturated, data: ProgramData, family: Family, u=None, shape=None):
    """(Laplace deviance, its gradient in (theta, beta)) at (theta, beta): the mode by PIRLS from ``u`` (zeros when
    None), traced (a pure function of arrays: jit or vmap it; a batch's datasets in ``hp.fit_batch``).

    ``data`` is a working pattern's :class:`ProgramData` without X (``joint=False``); ``shape``: a negative
    binomial's (an array, may be traced; ``saturated`` must then be its own), held in the gradient.  Also returns
    the mode's dict (``u``, ``b``, ``eta``, ``working_weights``, ``converged``, ...) as the third element.
    """
    layout = data.pattern.layout
    if u is None:
        u = tuple(jnp.zeros((ell, k), theta.dtype) for ell, k in zip(layout.n_levels, layout.ks))
    if shape is None:
        if family.name == "negative_binomial":
            raise ValueError("laplace_value_and_gradient: a negative binomial needs its shape")
        shape = jnp.ones((), theta.dtype)  # unused by the other families
    mode, gradient = _value_and_gradient(theta, beta, u, shape, saturated, data, family,
                                         PIRLS_TOL, PIRLS_MAX_STEPS, PIRLS_MAX_HALVINGS)
    return mode["laplace"], gradient, mode


def laplace_value(theta, beta, saturated, data: ProgramData, family: Family, u, shape):
    """The Laplace deviance alone at (theta, beta), PIRLS from ``u`` (traced; :func:`laplace_value_and_gradient`'s
    value without its gradient program): a negative binomial's shape derivative, a central difference whose sides
    start from the centre's mode, as ``hp.glmm``'s do on the host."""
    return _conditional_mode(theta, beta, u, shape, saturated, data, family, False, PIRLS_TOL, PIRLS_MAX_STEPS,
                             PIRLS_MAX_HALVINGS)["laplace"]


#: Compile the gradient program without LLVM's optimization (:mod:`hierpool.algebra.compiler_options`).
GRADIENT_QUICK = False


def compile_value_and_gradient(data: ProgramData, family: Family, tol: float = PIRLS_TOL, quick: bool | None = None):
    """Start compiling ``(theta, beta, u, shape, saturated, data) -> (mode, gradient)`` (cached): a Future.

    The mode is :func:`conditional_mode_in_program`'s (at ``joint=False``), the gradient that of its
    Laplace criterion in (theta, beta) (:func:`_gradient`)."""
    layout = data.pattern.layout
    u = tuple(jax.ShapeDtypeStruct((ell, k), np.float64) for ell, k in zip(layout.n_levels, layout.ks))
    theta = jax.ShapeDtypeStruct((layout.n_theta,), np.float64)
    beta = jax.ShapeDtypeStruct((data.X.shape[1],), np.float64)
    scalar = jax.ShapeDtypeStruct((), np.float64)
    family = dataclasses.replace(family, shape=None)
    quick = GRADIENT_QUICK if quick is None else quick
    key = ("gradient", shape_signature(data), family, tol, quick)

    def build():
        program = jax.jit(functools.partial(_value_and_gradient, family=family, tol=tol, max_steps=PIRLS_MAX_STEPS,
                                            max_halvings=PIRLS_MAX_HALVINGS))
        return compile_in_background(program.lower(theta, beta, u, scalar, scalar, data), quick=quick)

    return PROGRAMS.get(key, build)


def laplace_and_gradient(theta, beta, design: Design, family: Family, data: ProgramData, *, start_u=None,
                         saturated: float | None = None) -> tuple[ConditionalMode, np.ndarray]:
    """(:func:`conditional_mode_in_program` at (theta, beta), the gradient of its Laplace criterion there)."""
    if saturated is None:
        saturated = saturated_deviance(design, family)
    if start_u is None:
        start_u = tuple(np.zeros((t.n_levels, t.k)) for t in design.terms)
    program = compile_value_and_gradient(data, family).result()
    out, gradient = jax.device_get(program(
        np.asarray(theta, dtype=float), np.asarray(beta, dtype=float).reshape(-1),
        tuple(np.asarray(x, dtype=float) for x in start_u), np.float64(1.0 if family.shape is None else family.shape),
        np.float64(saturated), data))
    return _as_mode(out), np.asarray(gradient)
