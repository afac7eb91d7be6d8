"""PIRLS and the Laplace approximation as one compiled program: :func:`hierpool.algebra.laplace.conditional_mode`
with every step inside XLA.

The steps are the host's (:mod:`hierpool.algebra.laplace`): the family's working weights and
residual, one weighted Henderson solve (:func:`hierpool.algebra.henderson.point_estimates`) on the
system refilled in the program (:func:`hierpool.algebra.system.fill_in_program`, the pattern found
once on the host), step halving while the penalized deviance rises, and at the mode the
log-determinant with the weights there.  A glmer fit evaluates the criterion hundreds of times,
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
from .henderson import point_estimates, prediction_covariance, row_quadratic_forms
from .jax_runtime import jax, jnp, pytree_dataclass
from .laplace import PIRLS_MAX_HALVINGS, PIRLS_MAX_STEPS, PIRLS_TOL, ConditionalMode
from .linalg import theta_to_factors
from .system import SystemPattern, fill_in_program


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


def _random_part(data: ProgramData, b) -> jax.Array:
    out = jnp.zeros(data.y.shape[0])
    for (index, z), effects in zip(data.term_rows, b):
        out = out + jnp.sum(z * effects[index], axis=1)
    return out


def _effects(factors, u) -> tuple:
    return tuple(x @ t.T for x, t in zip(u, factors))


def _penalized_deviance(family: Family, data: ProgramData, mu, u) -> jax.Array:
    return jnp.sum(family.unit_deviances(data.y, mu, data.trials)) + sum(jnp.sum(jnp.square(x)) for x in u)


def _at(family: Family, data: ProgramData, factors, beta, u):
    """(eta, mu, penalized deviance) at (beta, u)."""
    eta = data.offset + data.X @ beta + _random_part(data, _effects(factors, u))
    mu = family.link.inverse(eta)
    return eta, mu, _penalized_deviance(family, data, mu, u)


def _conditional_mode(theta, beta, u, shape, saturated, data: ProgramData, family: Family, joint: bool, tol: float,
                      max_steps: int, max_halvings: int):
    if family.name == "negative_binomial":  # the shape is an argument: one program for every value of it
        family = dataclasses.replace(family, shape=shape)
    factors = theta_to_factors(theta, data.pattern.layout.ks[: len(data.term_rows)])
    eta, mu, deviance = _at(family, data, factors, beta, u)

    def step(state):
        u, beta, eta, mu, deviance, steps, _ = state
        _, weights, residual = family.working(data.y, eta, data.trials)
        fixed = data.offset + data.X @ beta
        response = (eta - data.offset if joint else eta - fixed) + residual
        solved_beta, solved_u, _, _ = point_estimates(theta, fill_in_program(data.pattern, weights, response))
        new_beta = solved_beta if joint else beta
        new_u = tuple(solved_u)

        def halve(inner):
            trial_u, trial_beta, _, _, _, halvings = inner
            trial_u = tuple(0.5 * (a + c) for a, c in zip(u, trial_u))
            trial_beta = 0.5 * (beta + trial_beta)
            return (trial_u, trial_beta, *_at(family, data, factors, trial_beta, trial_u), halvings + 1)

        def rises(inner):
            return (inner[4] > deviance * (1 + 1e-14)) & (inner[5] < max_halvings)

        trial = (new_u, new_beta, *_at(family, data, factors, new_beta, new_u), 0)
        new_u, new_beta, new_eta, new_mu, new_deviance, _ = jax.lax.while_loop(rises, halve, trial)
        converged = jnp.abs(deviance - new_deviance) <= tol * jnp.maximum(jnp.abs(new_deviance), 1.0)
        return new_u, new_beta, new_eta, new_mu, new_deviance, steps + 1, converged

    def going(state):
        return (state[5] < max_steps) & ~state[6]

    state = (tuple(u), beta, eta, mu, deviance, 0, False)
    u, beta, eta, mu, deviance, steps, converged = jax.lax.while_loop(going, step, state)
    _, weights, _ = family.working(data.y, eta, data.trials)
    # the log-determinant with the weights at the mode: Z's system only (X's block, when present, has no effect
    # on log |L_Z|, which is the factor of the random-effect columns eliminated first)
    fixed = data.offset + data.X @ beta
    logdet = point_estimates(theta, fill_in_program(data.pattern, weights, eta - fixed))[3]
    # -2 log p(y | mu) = the deviance + -2 log p(y | y) (``saturated``, from the host): no log Gamma in the program
    squared_u = sum(jnp.sum(jnp.square(x)) for x in u)
    log_likelihood = -0.5 * (deviance - squared_u + saturated)
    return dict(u=u, b=_effects(factors, u), beta=beta, eta=eta, mu=mu, working_weights=weights,
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


def saturated_deviance(design: Design, family: Family) -> float:
    """-2 log p(y | mu) - sum_i a_i d(y_i, mu_i), the same at every mu (the deviance's definition): -2 log p(y | y).

    Computed at the family's starting means, where both sides are finite.
    """
    mu = family.starting_mean(design.y, design.row_weights)
    trials = design.row_weights
    return float(-2.0 * np.sum(family.log_likelihood(design.y, mu, trials))
                 - np.sum(family.unit_deviances(design.y, mu, trials)))


def in_program(design: Design, family: Family) -> bool:
    """Whether the program's log-likelihood (the deviance plus :func:`saturated_deviance`) is exact for this data.

    Not for binomial rows with a non-integer number of successes: R's log-likelihood rounds them,
    and the deviance does not, so their difference depends on mu there.
    """
    if family.name != "binomial":
        return True
    successes = design.y * design.row_weights
    return bool(np.all(np.abs(successes - np.round(successes)) <= 1e-8 * np.maximum(1.0, successes)))


def conditional_mode_in_program(theta, beta, design: Design, family: Family, data: ProgramData, *,
                                joint: bool = False, start_u=None, tol: float = PIRLS_TOL,
                                saturated: float | None = None) -> ConditionalMode:
    """:func:`hierpool.algebra.laplace.conditional_mode` in the compiled program.

    ``data`` is :func:`program_data` of ``design`` with the pattern of its working design
    (:func:`hierpool.algebra.laplace.pirls_patterns`, ``joint`` as here); ``saturated`` is
    :func:`saturated_deviance` (computed when None).  Only where :func:`in_program` holds.
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


# --- the gradient of the Laplace criterion in (theta, beta) -------------------------------------------------------

def canonical(family: Family) -> bool:
    """Whether the link is the family's canonical one (logit binomial, log Poisson): then the Hessian of
    the penalized deviance in u is the Laplace log-determinant's own matrix, which :func:`_gradient` solves with."""
    return (family.name, family.link.name) in (("binomial", "logit"), ("poisson", "log"))


def _score_term(data: ProgramData, factors, s) -> tuple:
    """Lambda^T Z^T s per term: T_j^T sum over each level's rows of z_i s_i, shape (ell_j, k_j)."""
    out = []
    for (index, z), factor, ell in zip(data.term_rows, factors, data.pattern.layout.n_levels):
        out.append(jax.ops.segment_sum(z * s[:, None], index, num_segments=ell) @ factor)
    return tuple(out)


def _gradient(theta, beta, mode, family: Family, data: ProgramData):
    """d/d(theta, beta) of the Laplace criterion P(u*) + log |H| (u* the conditional mode, H = I + L'Z'WZL).

    With s = -1/2 dd/deta (the score: working weight times working residual), v_i = h_i dw_i/deta_i
    (h_i = z_i' L H^-1 L' z_i, row i's leverage, :func:`hierpool.algebra.henderson.row_quadratic_forms`)
    and g = H^-1 L'Z' v, the implicit function theorem on the mode's equation G = -L'Z's + u = 0 gives

        dL/dphi = dP/dphi|_u + dlog|H|/dtheta|_(W, u) + v' deta/dphi|_u - g' dG/dphi|_u,

    the first by the envelope theorem (dP/du = 0 at u*), the rest the log-determinant's dependence
    through the weights W(eta(phi, u*(phi))).  dG/du = H holds for a canonical link (Fisher weights
    are the observed information), where this is exact.  Each piece is reverse-mode autodiff of a
    small function with the others held (u*, v, g), plus the linear mixed model's own gradient of
    log |L_Z|^2 in theta at fixed weights (:func:`hierpool.algebra.criterion.objective_parts`).
    """
    layout = data.pattern.layout
    u = jax.lax.stop_gradient(tuple(mode["u"]))
    eta = jax.lax.stop_gradient(mode["eta"])
    _, weights, _ = family.working(data.y, eta, data.trials)
    weight_slope = jax.jvp(lambda e: family.working(data.y, e, data.trials)[1], (eta,), (jnp.ones_like(eta),))[1]
    fixed = data.offset + data.X @ beta
    system = fill_in_program(data.pattern, weights, eta - fixed)

    def logdet(theta):
        return objective_parts(theta, system).logdet_lz

    factors = theta_to_factors(theta, layout.ks)
    covariance = prediction_covariance(theta, system)
    (index0, z0), rest_rows = data.term_rows[0], data.term_rows[1:]
    v_rest, index_rest, offset = [], [], 0
    for (index, z), factor, (ell, k) in zip(rest_rows, factors[1:], zip(layout.n_levels[1:], layout.ks[1:])):
        v_rest.append(z @ factor)
        index_rest.append(offset + index[:, None] * k + jnp.arange(k)[None, :])
        offset += ell * k
    n = eta.shape[0]
    v_rest = jnp.concatenate(v_rest, axis=1) if v_rest else jnp.zeros((n, 0))
    index_rest = jnp.concatenate(index_rest, axis=1) if index_rest else jnp.zeros((n, 0), dtype=jnp.int32)
    leverage = row_quadratic_forms(covariance, z0 @ factors[0], index0, v_rest, index_rest)
    v = jax.lax.stop_gradient(leverage * weight_slope)
    g = jax.lax.stop_gradient(tuple(point_estimates(theta, fill_in_program(data.pattern, weights, v / weights))[1]))

    def eta_at(theta, beta):
        return data.offset + data.X @ beta + _random_part(data, _effects(theta_to_factors(theta, layout.ks), u))

    def envelope(theta, beta):
        mu = family.link.inverse(eta_at(theta, beta))
        return jnp.sum(family.unit_deviances(data.y, mu, data.trials)) + jnp.dot(v, eta_at(theta, beta))

    def implicit(theta, beta):
        _, w, r = family.working(data.y, eta_at(theta, beta), data.trials)
        score = _score_term(data, theta_to_factors(theta, layout.ks), w * r)
        return sum(jnp.sum(gj * (sj - uj)) for gj, sj, uj in zip(g, score, u))

    d_theta, d_beta = jax.grad(envelope, argnums=(0, 1))(theta, beta)
    i_theta, i_beta = jax.grad(implicit, argnums=(0, 1))(theta, beta)
    return jnp.concatenate([d_theta + i_theta + jax.grad(logdet)(theta), d_beta + i_beta])


def _value_and_gradient(theta, beta, u, shape, saturated, data: ProgramData, family: Family, tol: float,
                        max_steps: int, max_halvings: int):
    mode = _conditional_mode(theta, beta, u, shape, saturated, data, family, False, tol, max_steps, max_halvings)
    if family.name == "negative_binomial":
        family = dataclasses.replace(family, shape=shape)
    return mode, _gradient(theta, beta, mode, family, data)


def compile_value_and_gradient(data: ProgramData, family: Family, tol: float = PIRLS_TOL, quick: bool = False):
    """Start compiling ``(theta, beta, u, shape, saturated, data) -> (mode, gradient)`` (cached): a Future.

    The mode is :func:`conditional_mode_in_program`'s (at ``joint=False``), the gradient that of its
    Laplace criterion in (theta, beta) (:func:`_gradient`; canonical links only)."""
    layout = data.pattern.layout
    u = tuple(jax.ShapeDtypeStruct((ell, k), np.float64) for ell, k in zip(layout.n_levels, layout.ks))
    theta = jax.ShapeDtypeStruct((layout.n_theta,), np.float64)
    beta = jax.ShapeDtypeStruct((data.X.shape[1],), np.float64)
    scalar = jax.ShapeDtypeStruct((), np.float64)
    family = dataclasses.replace(family, shape=None)
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
