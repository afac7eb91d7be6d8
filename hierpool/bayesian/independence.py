"""Independence Metropolis-Hastings for a GLMM with one scalar random-effect term, proposing from its Laplace fit.

The posterior is :func:`hierpool.bayesian.glmm.glmm_model`'s, written in psi = log sd and x = (beta, b):

    log pi(psi, x) = sum_i l_i(eta_i) - sum_l [b_l^2 e^(-2 psi) / 2 + psi] + log p_sd(e^psi) + psi
                     + sum_c log p(beta_c),

l_i the family's log-likelihood of row i (:func:`~hierpool.algebra.family.log_likelihood_eta`), the second psi
the Jacobian of sd = e^psi.  Each chain proposes independently of where it is, from

    q(psi, x) = q(psi) q(x | psi),

and moves to the proposal with probability min(1, w' / w), w = pi / q (Tierney 1994): the chain's law is the
posterior whatever q is, so long as q covers it; how fast it mixes depends on how close q is.  Here:

* q(psi) is the Laplace approximation of the marginal posterior of psi,
  log pi~(psi) = log pi(psi, x^(psi)) - log|H(psi)| / 2 with x^(psi) the conditional mode and H(psi) the
  Fisher information of the conditional posterior there (lme4's PIRLS quantities, INLA's marginal:
  Rue, Martino & Chopin 2009), on a grid of nodes whose cells carry constant density, with exponential tails
  beyond the grid, so that q(psi) > 0 on the whole line;
* q(x | psi) is a multivariate Student t with :data:`DEGREES_OF_FREEDOM`, centred at x^(psi) (interpolated
  linearly between nodes), with the precision H of the nearest node.  Its heavier tails bound w where the
  posterior's tails are wider than the Laplace curvature (a herd with no cases: the prior, not the data,
  holds its effect down);
* then one round of adaptation (population Monte Carlo, Cappe et al. 2004): in the standardized coordinates
  e of that t (x = x^(psi) + H^(-1/2) e), each coordinate's shift and spread are set to the importance-weighted
  mean and sd of :data:`ADAPTATION_DRAWS` proposals, which undoes much of the skew the Laplace approximation
  misses (cbpp: efficiency 0.65 -> 0.78).

Each kept draw is several Metropolis-Hastings steps (:data:`STEPS_PER_EFFICIENCY`): a step costs one evaluation of
the target, no gradient, so thinning is cheap where NUTS would pay a trajectory.

With one scalar term H is an arrowhead matrix, [[A, B], [B', D]] with D diagonal, so everything is linear in the
number of levels: beta ~ t with precision S = A - B D^-1 B' (its Cholesky factor), b | beta with mean
b^ - D^-1 B' (beta - beta^) and precision D.

Where the Laplace approximation is poor (binary data with few rows per level, many levels) the weights vary
much and the chains stick; :func:`sample_independence` measures the importance-sampling efficiency
(sum w)^2 / (N sum w^2) of its proposals first and returns None below :data:`MIN_EFFICIENCY`, so that
``hp.bayes`` samples by NUTS instead.  The draws are exact either way (no approximation is left in the target).
:func:`~hierpool.validate.glmm_sbc` checks it (validation/glmm_validation.json).

References: Tierney (1994), Markov chains for exploring posterior distributions, Ann. Statist. 22; Rue, Martino &
Chopin (2009), JRSS B 71; Cappe, Guillin, Marin & Robert (2004), Population Monte Carlo, JCGS 13.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.linalg import cho_solve, solve_triangular
from scipy.special import gammaln

from ..algebra.family import Family, Link, log_likelihood_eta
from ..errors import ConvergenceError
from .priors import host_log_prob

#: Student t degrees of freedom of q(x | psi).
DEGREES_OF_FREEDOM = 30.0
#: Grid spacing in psi = log sd where the Laplace marginal is within :data:`BULK_DROP` nats of its maximum.
NODE_STEP = 0.15
#: Beyond this drop from the maximum the spacing grows by :data:`TAIL_GROWTH` per node (up to 1).
BULK_DROP = 3.0
TAIL_GROWTH = 2.0
#: The grid ends where the Laplace marginal is this many nats below its maximum (or after :data:`MAX_NODES`).
TAIL_DROP = 10.0
MAX_NODES = 300
#: The grid's maximum must lie within |psi| <= PSI_LIMIT (sd between 6e-6 and 1.6e5), else the sampler declines.
PSI_LIMIT = 12.0
#: Proposal mass of each exponential tail beyond the grid (so that q covers every psi).
TAIL_MASS = 0.005
#: Below this importance-sampling efficiency of the proposals, :func:`sample_independence` declines (NUTS samples).
MIN_EFFICIENCY = 0.3
#: Metropolis-Hastings steps per kept draw: ceil(STEPS_PER_EFFICIENCY / efficiency), between 2 and
#: MAX_STEPS_PER_DRAW.  A step costs one evaluation of the target (no gradient), so several steps per draw undo
#: much of the autocorrelation that rejections leave, for little time (3 at cbpp's efficiency, 0.78; see
#: benchmarks/RESULTS.md, "Bayesian cbpp: independence sampler").
STEPS_PER_EFFICIENCY = 2.3
MAX_STEPS_PER_DRAW = 10
#: Proposals drawn after the adaptation to measure its efficiency.
CHECK_DRAWS = 2000
#: At most this many draws of each chain are discarded (see :func:`sample_independence`).
BURN_IN = 100
#: Fisher-scoring iterations and tolerance (on the step) of the conditional mode.
NEWTON_ITERATIONS = 100
NEWTON_TOLERANCE = 1e-9
#: Rows x proposals evaluated at once by the exact target (memory bound).
CHUNK_VALUES = 4_000_000
#: A chain draws and weighs its proposals in blocks of about this many numbers (proposals x coefficients).
BLOCK_VALUES = 2_000_000
#: Proposals per call of the priors' compiled program (its one shape).
PRIOR_CHUNK = 4096
#: Draws of the adaptation round (:meth:`_Proposal.adapt`), and the least spread it may set.
ADAPTATION_DRAWS = 4000
SPREAD_FLOOR = 0.1


#: The families the sampler takes: without a shape parameter (binomial, Bernoulli among them, and Poisson).
FAMILIES = ("binomial", "poisson")


def applicable(design, held, priors) -> bool:
    """One scalar random-effect term, a family without a shape (binomial, Poisson), variance parameters not held, and
    Normal or flat priors on the fixed effects (the conditional modes of the proposal are those of such priors: under
    another prior, one bounded say, they could fall outside its support)."""
    return (held is None and len(design.terms) == 1 and design.terms[0].k == 1
            and design.family.name in FAMILIES
            and all(prior is None or type(prior).__name__ == "Normal" for prior in priors.beta))


def _log_prior(priors, psi, beta):
    """log p_sd(e^psi) + sum_c log p(beta_c) per proposal: the priors of :func:`~hierpool.bayesian.glmm.glmm_model`."""
    import jax.numpy as jnp

    def masked(prior, value):  # inside a program NumPyro does not validate: outside its support log_prob is finite
        return jnp.where(prior.support(value), prior.log_prob(value), -jnp.inf)

    out = masked(priors.sd[0], jnp.exp(psi)[:, None]).reshape(psi.shape)
    for c, prior in enumerate(priors.beta):
        if prior is not None:
            out = out + masked(prior, beta[:, c])
    return out


_log_prior_program = None


def _priors_log_density(priors, psi: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """:func:`_log_prior` on the host (:func:`~hierpool.bayesian.priors.host_log_prob`) or else in one compiled program,
    each call padded to :data:`PRIOR_CHUNK` proposals.

    Compiled, the priors are passed as the program's arguments (a pytree), so a model with the same kinds of
    priors reuses the program; evaluated eagerly, each of their operations would compile once per shape.
    """
    host = [host_log_prob(priors.sd[0], np.exp(psi))] + [
        np.zeros(psi.shape) if prior is None else host_log_prob(prior, beta[:, c])
        for c, prior in enumerate(priors.beta)]
    if all(part is not None for part in host):
        return np.sum(host, axis=0)
    global _log_prior_program
    if _log_prior_program is None:
        import jax

        _log_prior_program = jax.jit(_log_prior)
    out = np.empty(psi.shape[0])
    for start in range(0, psi.shape[0], PRIOR_CHUNK):
        part = slice(start, start + PRIOR_CHUNK)
        m = psi[part].shape[0]
        padded_psi, padded_beta = np.zeros(PRIOR_CHUNK), np.zeros((PRIOR_CHUNK, beta.shape[1]))
        padded_psi[:m], padded_beta[:m] = psi[part], beta[part]
        out[part] = np.asarray(_log_prior_program(priors, padded_psi, padded_beta))[:m]
    return out


@dataclass(frozen=True)
class _Model:
    """The arrays of the target: rows' response, trials, offset, X, level index and z; priors."""

    family: Family
    y: np.ndarray
    trials: np.ndarray
    offset: np.ndarray
    X: np.ndarray
    index: np.ndarray
    z: np.ndarray
    n_levels: int
    priors: object  # hierpool.bayesian.priors.Priors

    def beta_prior_precision(self):
        """(precision, loc) of each fixed effect's prior where it is Normal (0 where flat or not Normal: the proposal
        then leaves it out, and the acceptance step accounts for it)."""
        precision, loc = np.zeros(self.X.shape[1]), np.zeros(self.X.shape[1])
        for c, prior in enumerate(self.priors.beta):
            if type(prior).__name__ == "Normal":
                precision[c] = 1.0 / float(np.asarray(prior.scale)) ** 2
                loc[c] = float(np.asarray(prior.loc))
        return precision, loc

    def log_target(self, psi: np.ndarray, beta: np.ndarray, b: np.ndarray) -> np.ndarray:
        """log pi(psi, x) of the module docstring, one per proposal (psi (N,), beta (N, p), b (N, ell))."""
        out = np.empty(psi.shape[0])
        step = max(1, CHUNK_VALUES // max(self.y.shape[0], 1))
        for start in range(0, psi.shape[0], step):
            part = slice(start, start + step)
            eta = self.offset + beta[part] @ self.X.T + self.z * b[part][:, self.index]
            out[part] = np.sum(log_likelihood_eta(self.family.name, self.family.link.name, self.y, eta, self.trials,
                                                  constant=False), axis=1)
        out += -0.5 * np.exp(-2.0 * psi) * np.sum(b**2, axis=1) - (self.n_levels - 1) * psi  # + psi: sd's Jacobian
        out += _priors_log_density(self.priors, psi, beta)
        with np.errstate(invalid="ignore"):
            return np.where(np.isfinite(out), out, -np.inf)


@dataclass(frozen=True)
class _Node:
    """The conditional posterior of x at one psi: its mode, and H's arrowhead blocks."""

    psi: float
    mode: np.ndarray  # (p + ell,)
    schur_factor: np.ndarray  # lower L, S = A - B D^-1 B' = L L'
    coupling: np.ndarray  # (ell, p): D^-1 B'
    diagonal: np.ndarray  # (ell,): D
    half_log_det: float  # log|H| / 2
    log_marginal: float  # log pi~(psi), up to a constant


def _model(design, priors) -> _Model:
    spec, term = design.family, design.terms[0]
    return _Model(family=Family(spec.name, Link(spec.link)), y=np.asarray(design.y, dtype=float),
                  trials=np.asarray(design.row_weights, dtype=float), offset=np.asarray(design.offset, dtype=float),
                  X=np.asarray(design.X, dtype=float), index=np.asarray(term.index), z=np.asarray(term.z[:, 0], float),
                  n_levels=term.n_levels, priors=priors)


def _blocks(model: _Model, x: np.ndarray, precision_b: float, prior_precision, prior_loc):
    """(objective, gradient, A, B, D) of the conditional log posterior of x = (beta, b) at e^(-2 psi) = precision_b."""
    p = model.X.shape[1]
    beta, b = x[:p], x[p:]
    eta = model.offset + model.X @ beta + model.z * b[model.index]
    loglik = np.sum(log_likelihood_eta(model.family.name, model.family.link.name, model.y, eta, model.trials,
                                       constant=False))
    _, weights, residual = model.family.working(model.y, eta, model.trials)
    score = weights * residual  # d l / d eta for any link (w r = a mu' (y - mu) / V(mu))
    gradient = np.concatenate([model.X.T @ score - prior_precision * (beta - prior_loc),
                               np.bincount(model.index, model.z * score, model.n_levels) - precision_b * b])
    objective = loglik - 0.5 * precision_b * b @ b - 0.5 * np.sum(prior_precision * (beta - prior_loc) ** 2)
    A = model.X.T @ (weights[:, None] * model.X) + np.diag(prior_precision)
    wz = weights * model.z
    B = np.stack([np.bincount(model.index, wz * model.X[:, c], model.n_levels) for c in range(p)]) if p else (
        np.zeros((0, model.n_levels)))
    D = np.bincount(model.index, wz * model.z, model.n_levels) + precision_b
    return objective, gradient, A, B, D


def _node(model: _Model, psi: float, start: np.ndarray) -> _Node:
    """Fisher scoring (with step halving) to the conditional mode at psi; H's blocks there.

    Where that fails (an information matrix that is not positive definite, non-finite values), the node's log
    marginal is -inf: :func:`laplace_grid` leaves it out.
    """
    try:
        with np.errstate(all="ignore"):
            return _scored_node(model, psi, start)
    except (np.linalg.LinAlgError, ValueError, FloatingPointError):
        return _Node(psi, start, np.eye(model.X.shape[1]), np.zeros((model.n_levels, model.X.shape[1])),
                     np.ones(model.n_levels), 0.0, -np.inf)


def _scored_node(model: _Model, psi: float, start: np.ndarray) -> _Node:
    precision_b = np.exp(-2.0 * psi)
    prior_precision, prior_loc = model.beta_prior_precision()
    p = model.X.shape[1]
    x = start.copy()
    objective, gradient, A, B, D = _blocks(model, x, precision_b, prior_precision, prior_loc)
    for _ in range(NEWTON_ITERATIONS):
        coupling = B.T / D[:, None]
        factor = np.linalg.cholesky(A - B @ coupling)
        step_b = gradient[p:] / D
        step_beta = cho_solve((factor, True), gradient[:p] - B @ step_b) if p else np.zeros(0)
        step = np.concatenate([step_beta, step_b - coupling @ step_beta])
        for _ in range(30):
            trial = _blocks(model, x + step, precision_b, prior_precision, prior_loc)
            if np.isfinite(trial[0]) and trial[0] >= objective - 1e-10 * abs(objective):
                break
            step = step / 2
        x = x + step
        objective, gradient, A, B, D = trial
        if np.max(np.abs(step)) < NEWTON_TOLERANCE:
            break
    coupling = B.T / D[:, None]
    factor = np.linalg.cholesky(A - B @ coupling)
    half_log_det = float(np.sum(np.log(np.diag(factor))) + 0.5 * np.sum(np.log(D)))
    log_marginal = float(model.log_target(np.array([psi]), x[None, :p], x[None, p:])[0]) - half_log_det
    if not (np.all(np.isfinite(x)) and np.isfinite(half_log_det)):
        log_marginal = -np.inf
    return _Node(psi, x, factor, coupling, D, half_log_det, log_marginal if np.isfinite(log_marginal) else -np.inf)


def laplace_grid(model: _Model) -> list[_Node]:
    """Nodes of the module docstring: uphill from sd = 1 to the Laplace marginal's maximum (the step doubling while it
    climbs), then out in each direction at :data:`NODE_STEP` until it has dropped :data:`TAIL_DROP` nats (the spacing
    growing past :data:`BULK_DROP`).

    Nodes where the marginal is not finite (outside the sd prior's support, a failed Fisher scoring) are left out.
    An empty list where no finite maximum lies within |psi| <= :data:`PSI_LIMIT` (a posterior of the sd piled
    against 0 or unbounded): the caller then declines.
    """
    x0 = np.zeros(model.X.shape[1] + model.n_levels)
    nodes: dict[float, _Node] = {}

    def at(psi, near=None):
        psi = round(psi, 9)  # one node per grid point, whatever sum of steps reached it
        if psi not in nodes:  # start Fisher scoring on the line through the two nearest modes (fewer iterations)
            start = x0 if near is None else nodes[near].mode
            other = min((q for q in nodes if q != near), key=lambda q: abs(q - psi), default=None)
            if near is not None and other is not None:
                t = np.clip((psi - near) / (near - other), -2.0, 2.0)
                start = start + t * (start - nodes[other].mode)
            nodes[psi] = _node(model, psi, start)
        return nodes[psi]

    best = next((at(psi).psi for psi in (0.0, -1.0, 1.0, -2.0, 2.0, -4.0, 4.0)
                 if np.isfinite(at(psi).log_marginal)), None)
    if best is None:
        return []
    step = NODE_STEP
    for _ in range(MAX_NODES):
        up, down = at(best + step, best), at(best - step, best)
        top = max((nodes[best], up, down), key=lambda n: n.log_marginal)
        if top.psi == best:
            if step == NODE_STEP:
                break
            step = NODE_STEP  # overshot with a long step: climb on at the grid's spacing
        else:
            best, step = top.psi, min(2 * step, 2.0)
        if abs(best) > PSI_LIMIT:
            return []
    peak = nodes[best].log_marginal
    for direction in (1.0, -1.0):
        psi, spacing = best, NODE_STEP
        while len(nodes) < MAX_NODES and abs(psi + direction * spacing) <= PSI_LIMIT + 1.0:
            node = at(psi + direction * spacing, psi)
            psi = node.psi
            drop = peak - node.log_marginal
            if drop >= TAIL_DROP or not np.isfinite(drop):
                break
            if drop > BULK_DROP:
                spacing = min(spacing * TAIL_GROWTH, 1.0)
    finite = [nodes[psi] for psi in sorted(nodes) if np.isfinite(nodes[psi].log_marginal)]
    return finite if len(finite) >= 2 else []


class _Proposal:
    """q(psi, x) over the nodes: draws and their log density."""

    def __init__(self, nodes: list[_Node], p: int):
        self.nodes, self.p = nodes, p
        d = nodes[0].mode.size
        self.shift, self.spread = np.zeros(d), np.ones(d)  # of the standardized draw (see adapt)
        self.centres = np.array([n.psi for n in nodes])
        # each node's cell reaches half way to its neighbours, and as far beyond the end nodes
        gaps = np.diff(self.centres)
        self.bounds = np.concatenate([[self.centres[0] - gaps[0] / 2], self.centres[:-1] + gaps / 2,
                                      [self.centres[-1] + gaps[-1] / 2]])
        widths = np.diff(self.bounds)
        log_mass = np.array([n.log_marginal for n in nodes]) + np.log(np.maximum(widths, 1e-300))
        log_mass[widths <= 0] = -np.inf
        mass = np.exp(log_mass - np.max(log_mass))
        self.cell_mass = (1.0 - 2 * TAIL_MASS) * mass / mass.sum()
        self.cell_density = np.where(widths > 0, self.cell_mass / np.maximum(widths, 1e-300), 0.0)
        # each tail's rate: the marginal's slope over the last cells, at least 0.5 (psi's prior tail, e^psi, has 1)
        lm = np.array([n.log_marginal for n in nodes])
        self.rate_low = max((lm[1] - lm[0]) / (self.centres[1] - self.centres[0]), 0.5) if len(nodes) > 1 else 1.0
        self.rate_high = max((lm[-2] - lm[-1]) / (self.centres[-1] - self.centres[-2]), 0.5) if len(nodes) > 1 else 1.0
        self.modes = np.stack([n.mode for n in nodes])
        self.inverse_schur = [solve_triangular(n.schur_factor, np.eye(p), lower=True) for n in nodes]
        self.half_log_dets = np.array([n.half_log_det for n in nodes])
        d = self.modes.shape[1]
        nu = DEGREES_OF_FREEDOM
        self.t_constant = gammaln((nu + d) / 2) - gammaln(nu / 2) - d / 2 * np.log(nu * np.pi)

    def draw(self, rng: np.random.Generator, size: int):
        """(psi (N,), beta (N, p), b (N, ell), log q (N,))."""
        which = np.searchsorted([TAIL_MASS, 1 - TAIL_MASS], rng.uniform(size=size))  # 0: low tail, 1: cells, 2: high
        cumulative = np.cumsum(self.cell_mass / self.cell_mass.sum())
        cell = np.minimum(np.searchsorted(cumulative, rng.uniform(size=size) * cumulative[-1]), len(self.nodes) - 1)
        psi = self.bounds[cell] + rng.uniform(size=size) * (self.bounds[cell + 1] - self.bounds[cell])
        psi = np.where(which == 0, self.bounds[0] - rng.exponential(1 / self.rate_low, size), psi)
        psi = np.where(which == 2, self.bounds[-1] + rng.exponential(1 / self.rate_high, size), psi)
        d, p = self.modes.shape[1], self.p
        u = rng.standard_normal((size, d))
        scale = np.sqrt(rng.chisquare(DEGREES_OF_FREEDOM, size) / DEGREES_OF_FREEDOM)
        standardized = self.shift + self.spread * u / scale[:, None]  # shift + spread * (a t draw)
        nearest = self._nearest(psi)
        order = np.argsort(nearest, kind="stable")  # the proposals node by node, in contiguous slices
        starts = np.searchsorted(nearest[order], np.arange(len(self.nodes) + 1))
        e = standardized[order]
        x = self._mean(psi[order])
        for k in np.flatnonzero(np.diff(starts)):
            rows, node = slice(starts[k], starts[k + 1]), self.nodes[k]
            shift_beta = e[rows, :p] @ self.inverse_schur[k]  # rows of S^(-1/2)' e: L^-T e as row vectors
            x[rows, :p] += shift_beta
            x[rows, p:] += e[rows, p:] / np.sqrt(node.diagonal) - shift_beta @ node.coupling.T
        x[order] = x.copy()
        quadratic = np.sum(u**2, axis=1) / scale**2
        log_q = (self.t_constant + self.half_log_dets[nearest] - np.sum(np.log(self.spread))
                 - (DEGREES_OF_FREEDOM + d) / 2 * np.log1p(quadratic / DEGREES_OF_FREEDOM))
        self.last_standardized = standardized
        return psi, x[:, :p], x[:, p:], log_q + self._log_q_psi(psi)

    def adapt(self, log_weights: np.ndarray):
        """Match the shift and spread of the standardized draws of the last :meth:`draw` to their importance-weighted
        mean and sd (one round of population Monte Carlo: Cappe et al. 2004), which undoes much of the skew the Laplace
        approximation misses."""
        finite = np.isfinite(log_weights)
        if not finite.any():
            return
        w = np.where(finite, np.exp(log_weights - np.max(log_weights[finite])), 0.0)
        w = w / w.sum()
        e = self.last_standardized
        self.shift = w @ e
        self.spread = np.sqrt(np.maximum(w @ (e - self.shift) ** 2, SPREAD_FLOOR**2))

    def _nearest(self, psi):
        return np.clip(np.searchsorted(self.bounds, psi, side="right") - 1, 0, len(self.nodes) - 1)

    def _mean(self, psi):
        if len(self.nodes) == 1:
            return np.repeat(self.modes, psi.size, axis=0)
        right = np.clip(np.searchsorted(self.centres, psi), 1, len(self.nodes) - 1)
        t = np.clip((psi - self.centres[right - 1]) / (self.centres[right] - self.centres[right - 1]), 0.0, 1.0)
        return (1 - t)[:, None] * self.modes[right - 1] + t[:, None] * self.modes[right]

    def _log_q_psi(self, psi):
        low, high = psi < self.bounds[0], psi > self.bounds[-1]
        with np.errstate(divide="ignore"):
            inside = np.log(self.cell_density[self._nearest(psi)])
        return np.where(low, np.log(TAIL_MASS * self.rate_low) - self.rate_low * (self.bounds[0] - psi),
                        np.where(high, np.log(TAIL_MASS * self.rate_high) - self.rate_high * (psi - self.bounds[-1]),
                                 inside))


def importance_efficiency(log_weights: np.ndarray) -> float:
    """(sum w)^2 / (N sum w^2): the fraction of independent draws importance sampling with these weights is worth."""
    finite = np.isfinite(log_weights)
    if not finite.any():
        return 0.0
    w = np.where(finite, np.exp(log_weights - np.max(log_weights[finite])), 0.0)
    return float(np.sum(w) ** 2 / (w.size * np.sum(w**2)))


def sample_independence(design, priors, chains: int, draws: int, tune: int, seed: int, force: bool = False,
                        thin: int | None = None):
    """Independence Metropolis-Hastings draws of a one-scalar-term GLMM (module docstring), or None.

    None when the proposals' importance-sampling efficiency is below :data:`MIN_EFFICIENCY` (unless ``force``).
    Returns (beta (chains, draws, p), [b (chains, draws, ell, 1)], [sd (chains, draws, 1)], [None], None, stats,
    efficiency).  Each draw is ``thin`` Metropolis-Hastings steps (by default from the efficiency:
    :data:`STEPS_PER_EFFICIENCY`).  The sampler's
    tuning is its adaptation round, and each chain starts at a proposal, a draw from about the posterior: so a chain
    discards min(``tune``, :data:`BURN_IN`) draws, not ``tune``.
    """
    model = _model(design, priors)
    nodes = laplace_grid(model)
    if not nodes:
        if force:
            raise ConvergenceError(
                "method='independence': the Laplace approximation of the sd's posterior has no finite maximum "
                f"with sd between {np.exp(-PSI_LIMIT):.0e} and {np.exp(PSI_LIMIT):.0e} (check the sd prior); "
                "use method='full'")
        return None
    proposal = _Proposal(nodes, model.X.shape[1])
    pilot = proposal.draw(np.random.default_rng([seed, chains, 1]), ADAPTATION_DRAWS)
    proposal.adapt(model.log_target(*pilot[:3]) - pilot[3])
    check = proposal.draw(np.random.default_rng([seed, chains, 2]), CHECK_DRAWS)
    efficiency = importance_efficiency(model.log_target(*check[:3]) - check[3])
    if efficiency < MIN_EFFICIENCY and not force:
        return None
    if thin is None:  # rejections, about 1 - efficiency of the steps, are made up by more steps per draw
        thin = int(np.clip(np.ceil(STEPS_PER_EFFICIENCY / max(efficiency, 1e-3)), 2, MAX_STEPS_PER_DRAW))
    burn_in = min(tune, BURN_IN)
    p, ell = model.X.shape[1], model.n_levels
    out = {name: np.empty((chains, draws) + shape) for name, shape in
           (("psi", ()), ("x", (p + ell,)), ("lp", ()), ("acceptance", ()))}
    draw_rng, accept_rng = np.random.default_rng([seed, chains, 3]), np.random.default_rng([seed, chains, 4])
    for chain in range(chains):
        _run_chain(model, proposal, burn_in, draws, thin, draw_rng, accept_rng,
                   {name: value[chain] for name, value in out.items()})
    stats = {
        "diverging": np.zeros((chains, draws), dtype=bool),
        "acceptance_rate": out["acceptance"],
        "n_steps": np.full((chains, draws), thin, dtype=np.int64),
        "lp": out["lp"],  # log pi in (log sd, beta, b), up to a constant
    }
    return (out["x"][..., :p], [out["x"][..., p:, None]], [np.exp(out["psi"])[..., None]], [None], None, stats,
            efficiency)


def _run_chain(model: _Model, proposal: "_Proposal", burn_in: int, draws: int, thin: int, draw_rng, accept_rng,
               out: dict) -> None:
    """One chain of (burn_in + draws) x thin steps, its proposals drawn and weighed in blocks of about
    :data:`BLOCK_VALUES` numbers (memory bounded whatever the number of levels); fills ``out``'s kept draws:
    the state after steps burn_in * thin + thin - 1, + 2 thin - 1, ...; each draw's acceptance rate is the mean
    acceptance probability of its thin steps."""
    d = proposal.modes.shape[1]
    total, first_kept = (burn_in + draws) * thin, burn_in * thin
    block = max(thin, BLOCK_VALUES // max(d, 1) // thin * thin)  # a multiple of thin: draws do not straddle blocks
    current = None  # (psi, x, log pi, log w) of the chain's state
    for start in range(0, total, block):
        m = min(block, total - start)
        psi, beta, b, log_q = proposal.draw(draw_rng, m)
        log_pi = model.log_target(psi, beta, b)
        log_w = np.where(np.isnan(log_pi - log_q), -np.inf, log_pi - log_q)
        states, probs = metropolis_states(log_w, np.log(accept_rng.uniform(size=m)),
                                          None if current is None else current[3])
        t = np.arange(start, start + m)
        kept = (t >= first_kept) & ((t - first_kept) % thin == thin - 1)
        slots = (t[kept] - first_kept) // thin
        chosen = states[kept]
        from_block = chosen >= 0
        if current is not None and not from_block.all():  # still at the state reached in an earlier block
            out["psi"][slots[~from_block]] = current[0]
            out["x"][slots[~from_block]] = current[1]
            out["lp"][slots[~from_block]] = current[2]
        rows = chosen[from_block]
        out["psi"][slots[from_block]] = psi[rows]
        out["x"][slots[from_block]] = np.hstack([beta[rows], b[rows]])
        out["lp"][slots[from_block]] = log_pi[rows]
        step_probs = probs[t >= first_kept]
        first_slot = (max(start, first_kept) - first_kept) // thin
        if step_probs.size:
            out["acceptance"][first_slot:first_slot + step_probs.size // thin] = step_probs.reshape(-1, thin).mean(1)
        if states[-1] >= 0:
            last = states[-1]
            current = (psi[last], np.concatenate([beta[last], b[last]]), log_pi[last], log_w[last])


def metropolis_states(log_weights: np.ndarray, log_u: np.ndarray, current_w: float | None):
    """Independence Metropolis-Hastings over one block of proposals: from a state of log weight ``current_w`` (None:
    the chain starts at the block's first proposal), move to proposal t with probability min(1, w_t / w_current).

    Returns (the index in the block of the state after each step, -1 while still at the state the block started
    from; each step's acceptance probability).  NaN or -inf weights are never accepted.
    """
    row, u = log_weights.tolist(), log_u.tolist()  # plain floats: NumPy scalars cost ~10x per step
    total = len(row)
    states, probs = [-1] * total, [1.0] * total
    current = -1
    first = 0
    if current_w is None:
        current, current_w, first = 0, row[0], 1
        states[0] = 0
    for t in range(first, total):
        ratio = row[t] - current_w
        probs[t] = 1.0 if ratio >= 0 else math.exp(ratio) if ratio > -745 else 0.0
        if u[t] < ratio:
            current, current_w = t, row[t]
        states[t] = current
    return np.asarray(states, dtype=np.int64), np.asarray(probs)
