"""Pure JAX kernels shared by the closed-form and the Bayesian engines.

Everything here is a function of arrays with static shape information only,
so it can be jit-compiled, differentiated and vmapped.  The small-matrix
algebra (:func:`cholesky`, :func:`tri_inverse` and the entry lists) and
:func:`factors_to_theta` also run on NumPy arrays (:func:`array_namespace`).

Relative covariance factors follow lme4 (Bates et al. 2015, eq. 4): the
random effects of term j are b = (I_ell (x) T_j) u with T_j lower triangular,
and theta holds the lower triangles of all T_j, each in column-major order.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

# JAX is imported when a traced branch first needs it (float64 is turned on then):
# the host branches run without it
from .jax_runtime import jax, jnp


def array_namespace(*arrays):
    """``numpy`` when every argument is a NumPy array or a Python/NumPy scalar, else ``jax.numpy`` (tracers too).

    The algebra written with it runs unchanged inside compiled programs and on the
    host, where a compiled program would cost more to build than the arithmetic
    (``hp.bayes``' exact effect draws of a one-term model: benchmarks/RESULTS.md,
    "Bayesian engine, sixth session").
    """
    on_host = all(isinstance(a, (np.ndarray, np.generic, int, float)) for a in arrays if a is not None)
    return np if on_host else jnp


@functools.cache
def tril_positions(k: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of the k(k+1)/2 entries of a lower triangle in column-major order (lme4's).

    Cached (read-only arrays): every criterion evaluation on the host asks for them.
    """
    cols, rows = np.triu_indices(k)
    rows.setflags(write=False)
    cols.setflags(write=False)
    return rows, cols


def theta_lower_bounds(ks: tuple[int, ...]) -> np.ndarray:
    """Lower bounds of theta: 0 for the diagonal of each T_j, -inf elsewhere."""
    bounds = []
    for k in ks:
        rows, cols = tril_positions(k)
        bounds.append(np.where(rows == cols, 0.0, -np.inf))
    return np.concatenate(bounds)


def canonical_theta(theta: np.ndarray, ks: tuple[int, ...]) -> np.ndarray:
    """theta with every T_j's diagonal made non-negative, the covariances T_j T_j^T unchanged.

    Negating a column of T_j leaves T_j T_j^T, hence the model, as it is; lme4 bounds the
    diagonal at 0 only to pick one of these equivalent factors.  So an unconstrained
    optimizer may wander through negative diagonals, and its optimum is mapped back here
    by negating each column whose diagonal is negative.  Leading axes of ``theta`` (many thetas) are kept.
    """
    theta = np.array(theta, dtype=float)
    offset = 0
    for k in ks:
        rows, cols = tril_positions(k)
        block = theta[..., offset : offset + len(rows)]  # a view: column-major lower triangle of T_j
        for column in range(k):
            entries = cols == column
            diagonal = block[..., np.flatnonzero(entries & (rows == column))[0]]
            block[..., entries] *= np.where(diagonal < 0, -1.0, 1.0)[..., None]
        offset += len(rows)
    return theta


def rank_reduced_theta(theta: np.ndarray, ks: tuple[int, ...], terms=None) -> np.ndarray:
    """theta with each term of k >= 2 coefficients moved to the rank-deficient covariance nearest its own: T_j T_j^T
    less its smallest eigenvalue's part, factored again (its last diagonal 0 to rounding, not exactly: a correlation
    of +-1 where k = 2; at exactly 0 the criterion's slope in that diagonal would vanish, and no search leave it).
    Terms of one coefficient are unchanged, and so are those not in ``terms`` (positions in ``ks``; None: every
    term).  Leading axes of ``theta`` (many thetas) are kept (NumPy).

    Where a term's T_j T_j^T is near singular, its Cholesky factor is ill-determined: with T_11 near 0 the
    criterion barely depends on the direction of (T_21, T_22), and a gradient search crawls around that circle
    towards the boundary optimum lme4's bounded optimizers reach (T_22 = 0).  This point is that boundary's, reached
    in one move: a restart from it (``hp.fit_batch``'s stalled several-term searches,
    :func:`hierpool.algebra.search.terms.search_on_host`) converges where the search did not.  A non-finite theta
    gives NaN for its terms (the others' rows are unaffected).
    """
    theta = np.array(theta, dtype=float)
    offset = 0
    for j, k in enumerate(ks):
        rows, cols = tril_positions(k)
        size = len(rows)
        if k >= 2 and (terms is None or j in terms):
            block = theta[..., offset : offset + size]
            finite = np.all(np.isfinite(block), axis=-1)
            factor = np.zeros(theta.shape[:-1] + (k, k))
            factor[..., rows, cols] = np.where(finite[..., None], block, 0.0)  # eigh refuses a stack holding a NaN
            with np.errstate(all="ignore"):  # a huge theta overflows to NaN: not a restart
                values, vectors = np.linalg.eigh(factor @ np.swapaxes(factor, -1, -2))
            values[..., 0] = 0.0
            reduced = np.einsum("...ij,...j,...kj->...ik", vectors, values, vectors)
            # a ridge of 1e-14 of the largest eigenvalue: the Cholesky factor of the singular matrix exists
            ridge = 1e-14 * np.maximum(values[..., -1], 1e-300)[..., None, None] * np.eye(k)
            reduced = np.linalg.cholesky(reduced + ridge)[..., rows, cols]
            theta[..., offset : offset + size] = np.where(finite[..., None], reduced, np.nan)
        offset += size
    return theta


def _units_of(theta: np.ndarray, scales) -> np.ndarray:
    """``scales`` (theta's units, :func:`theta_scales`) as theta's shape; 1 where None."""
    return np.ones_like(theta) if scales is None else np.broadcast_to(np.asarray(scales, dtype=float), theta.shape)


def _diagonals_at_zero(theta: np.ndarray, ks: tuple[int, ...], at_most: float) -> np.ndarray:
    """Positions in ``theta`` of the diagonal elements of its T_j at 0 (at most ``at_most``)."""
    return np.flatnonzero((theta_lower_bounds(ks) == 0) & (theta <= at_most))


#: Where a vector term's T_j T_j^T ends singular off its last diagonal, the search restarts from it plus half its
#: mean variance times the correlation matrices with these correlations between every pair of coefficients
#: (:func:`full_rank_probes`).
FULL_RANK_CORRELATIONS = (0.0, 0.9, -0.9)


def full_rank_probes(theta: np.ndarray, ks: tuple[int, ...], at_most: float = 0.0, scales=None,
                     rank_deficient: bool = False) -> list[np.ndarray]:
    """theta with each vector term whose T_j has a diagonal at 0 other than its last moved inside: the Cholesky
    factor of T_j T_j^T + (trace / 2k) R for R with each correlation of :data:`FULL_RANK_CORRELATIONS` off its
    diagonal (-0.9 only where k = 2: a k x k matrix of equal correlations is positive definite above -1 / (k - 1)).

    With T_11 = 0 a search sits on the face where the intercept's variance is 0 and T_21, T_22 share the slope's
    (a circle of equal criteria), and setting T_11 small leads back to it; a lower singular optimum may lie on the
    face of a correlation of +-1 (T_22 = 0, the last diagonal: the boundary :func:`rank_reduced_theta` moves to),
    which ``hp.fit_batch``'s search reached: (1 + x | g) on 5 groups of 4-5 rows, REML 74.509 against 74.018
    (``hp.lmm``), a Poisson model's -2 log L 153.763 against 153.649 (``hp.glmm``).  From a covariance of full
    rank near the fit's a search can reach either.  Empty where no such term.

    ``scales``: theta's units (:func:`theta_scales`, one per row of T_j; 1 by default): the covariance is taken in
    them (D^-1 T_j, D the rows' units, is its Cholesky factor there), its mean variance at least 1e-2 of them, and
    mapped back, so that prior weights times c move every probe by 1 / sqrt(c), as they move the optimum.  With the
    floor in theta's own units, weights of ~1e6 put a probe at 70 units, and ``hp.lmm`` ended on T_11 = 0, 0.0053
    above the optimum it reached with the same weights times 10 or 1e-3 (the fifty-fifth session).
    """
    theta = np.asarray(theta, dtype=float)
    scales = _units_of(theta, scales)
    probes, offset = [], 0
    for k in ks:
        rows, cols = tril_positions(k)
        size = len(rows)
        diagonal = theta[offset : offset + size][rows == cols]
        if k >= 2 and np.any(diagonal[:-1] <= at_most):  # (at_most: a diagonal this near 0 counts as at it)
            unit = scales[offset : offset + size]
            factor = np.zeros((k, k))
            factor[rows, cols] = theta[offset : offset + size] / unit
            covariance = factor @ factor.T
            mean_variance = max(np.trace(covariance) / k, 1e-2)
            for correlation in FULL_RANK_CORRELATIONS:
                if correlation <= -1.0 / (k - 1):
                    continue
                shape = np.full((k, k), correlation) + (1.0 - correlation) * np.eye(k)
                probe = theta.copy()
                probe[offset : offset + size] = unit * np.linalg.cholesky(covariance + 0.5 * mean_variance
                                                                          * shape)[rows, cols]
                probes.append(probe)
                if rank_deficient and correlation != 0.0:
                    probe = probe.copy()  # that covariance rank-reduced (in the units): on a face of correlation +-1
                    probe[offset : offset + size] = unit * rank_reduced_theta(probe[offset : offset + size] / unit,
                                                                              (k,))
                    probes.append(probe)
        offset += size
    return probes


#: Values a diagonal element of T_j that ends at 0 is moved to, for a search to start again from each
#: (:func:`boundary_probes`).
BOUNDARY_PROBE_VALUES = (0.05, 0.5)


def theta_scales(ks: tuple[int, ...], mean_squares) -> np.ndarray:
    """(..., n_theta) each element of theta's unit: element (r, c) of T_j the inverse root-mean-square of its row's
    column of Z, 1 / sqrt(mean_i z_ir^2) (unweighted, over the rows), as b_r = sum_c T_rc u_c moves with z_r.
    ``mean_squares``: per term, (..., k_j) (leading axes a batch's datasets).  :func:`boundary_probes` places its
    probes in these units, and ``hp.lmm``'s L-BFGS-B searches in them
    (:func:`hierpool.closedform.optimize.optimize_theta`).

    theta_jj times the root-mean-square is the effect's spread on the response in residual sds whatever the
    covariate's units (an intercept's is 1): a slope on days (root-mean-square 5.3) has a theta five times smaller
    than an intercept of the same share of the variance.  A column that is all zero has unit 1."""
    out = []
    for k, squares in zip(ks, mean_squares):
        squares = np.asarray(squares, dtype=float)
        rows, _ = tril_positions(k)
        with np.errstate(all="ignore"):
            unit = np.where(squares > 0, 1.0 / np.sqrt(np.where(squares > 0, squares, 1.0)), 1.0)
        out.append(unit[..., rows])
    return np.concatenate(out, axis=-1)


def terms_theta_scales(terms, groups=None, n_groups: int = 1, weights=None) -> np.ndarray:
    """:func:`theta_scales` of random-effect terms (each with ``k`` and its rows' columns ``z``), the mean squares
    taken over all rows (``groups`` None: (n_theta,)) or over each group's rows (``groups`` (N,) codes below
    ``n_groups``: (n_groups, n_theta), a batch's datasets); with prior weights ``weights`` (N,) in their units too:
    over the square root of their geometric mean (of the group's rows).

    Weights times c leave the model as it is with theta over sqrt(c): unscaled, weights of 1e7 put a two-term
    model's optimum at theta 4e-4, 2,500 times below its units, and ``hp.lmm``'s search ended at theta = 0, REML 61
    above ``hp.fit_batch``'s (the forty-third session's review).  In whole decades (:func:`weights_unit`).  With
    known residual sds (the weights 1 / se^2, sigma 1) the same unit is their geometric mean: theta is an sd in the
    response's units, and the searches run over it (:func:`hierpool.closedform.optimize.known_sds_unit`)."""
    if groups is None:
        squares = [np.mean(np.square(term.z), axis=0) for term in terms]
    else:
        rows = np.maximum(np.bincount(groups, minlength=n_groups), 1).astype(float)
        squares = [segment_sum(np.square(term.z), groups, n_groups) / rows[:, None] for term in terms]
    scales = theta_scales(tuple(term.k for term in terms), squares)
    if weights is None:
        return scales
    unit = weights_unit(weights, groups, n_groups)
    return scales * (unit if groups is None else unit[:, None])


def weights_unit(weights, groups=None, n_groups: int = 1):
    """theta's unit of prior weights ``weights`` (of each group's rows: (n_groups,)): 1 over the square root of
    their geometric mean, in whole decades (``10^-round(log10 gm) / 2``), so that weights spread about 1 keep
    theta's own units (their sample's geometric mean moves by a factor 1.6 either way: the probes off the boundary
    with it, which moved 2 of 300 crossed fits with weights 10^U(-2, 2) to other minima, both higher) and weights
    times 1e7 have theta's over 10^3.5.  :func:`terms_theta_scales` and ``hp.lmm``'s moment start."""
    from ..spec.design import weights_decades  # (the weights' scale has its home with their checks)

    return decade_unit(weights_decades(weights, groups, n_groups))


def decade_unit(mean_log10_weight):
    """:func:`weights_unit` from the weights' mean log10: ``10^-round(mean) / 2`` (whole decades of the weights, half
    decades of sds).  The mean is taken to 9 decimals first: summed in another order (``hp.lmm``'s system and a
    batch's datasets), sds all 10^1.75 gave a mean of -3.5 one way and -3.4999999999999996 the other, units 100 and
    31.6, and the two engines judged a slope's sd of 0.0061 singular in one and not in the other (the fifty-second
    session's review)."""
    unit = 10.0 ** (-0.5 * np.round(np.round(mean_log10_weight, 9)))
    return float(unit) if np.ndim(unit) == 0 else unit


def log_weights_unit(log_weights, n):
    """:func:`weights_unit` from the weights' natural logs summed over ``n`` rows (a system's ``log_weights``, or a
    batch's statistics', one per dataset): with known residual sds (weights 1 / se^2) their geometric mean, the unit
    of theta, an sd in the response's units there."""
    return decade_unit(np.asarray(log_weights, dtype=float) / np.maximum(np.asarray(n, dtype=float), 1) / np.log(10.0))


def boundary_probes(theta: np.ndarray, ks: tuple[int, ...], at_most: float = 0.0, scales=None) -> list[np.ndarray]:
    """Starts inside the boundary where an optimum ``theta`` has diagonal elements of some T_j at 0 (at most
    ``at_most``): each such element moved to each of :data:`BOUNDARY_PROBE_VALUES` times its ``scales`` entry (the
    column's inverse root-mean-square, :func:`theta_scales`; 1 by default), then
    :func:`full_rank_probes`.  Empty where no diagonal element is at 0.

    The criterion depends on a last diagonal of T_j only through its square, so its gradient there is exactly 0 and
    a gradient search never looks past the boundary, while a lower optimum may lie inside (lme4's derivative-free
    BOBYQA usually finds it).  ``hp.lmm``'s restarts from a boundary optimum
    (:func:`hierpool.closedform.optimize.optimize_theta`) and a weighted batch's search for other minima
    (:func:`other_minimum_starts`) start from these.

    In the columns' units because a probe too far out is no probe: L-BFGS-B's first step from a slope's theta of
    0.05, where its optimum was 0.023 (a covariate of root-mean-square 5.3), went on to 0, whose gradient is 0, and
    stopped there; ``(1 | g) + (0 + x | g)`` then stayed on the face where the slope's variance is 0, 0.127 above
    lme4's fit on the other (a sleepstudy-shaped dataset; the forty-second session).
    """
    theta = np.asarray(theta, dtype=float)
    scales = _units_of(theta, scales)
    probes = []
    for j in _diagonals_at_zero(theta, ks, at_most):
        for value in BOUNDARY_PROBE_VALUES:
            probe = theta.copy()
            probe[j] = value * scales[j]
            probes.append(probe)
    if not probes:
        return []
    return probes + full_rank_probes(theta, ks, at_most, scales, rank_deficient=True)


#: Multiples of its unit at which a diagonal element of T_j that ends at 0 is set, the others held, for the criterion
#: to be read along it (:func:`boundary_axis_points`): 0.001 to 1 in half decades.
BOUNDARY_AXIS_SCAN = 10.0 ** np.arange(-3.0, 0.25, 0.5)


def boundary_axis_points(theta: np.ndarray, ks: tuple[int, ...], at_most: float = 0.0, scales=None) -> list[np.ndarray]:
    """Per diagonal element of some T_j at 0 (at most ``at_most``) in ``theta``, the points (S, n_theta) with that
    element at each of :data:`BOUNDARY_AXIS_SCAN` times its ``scales`` entry (1 by default), the others as they are.

    The criterion depends on such an element only through its square, so a boundary point is a stationary point
    along it whether it is a minimum there or not; where the criterion falls along the element, the minimum it falls
    to may lie closer to the boundary than :data:`BOUNDARY_PROBE_VALUES` reach, and a search from a probe above the
    boundary's criterion steps over it onto the boundary, which is lower than the probe: with known sds of 1e-3 to 10,
    ``y ~ x + (1 | g) + (1 | h)`` by REML had its minimum at theta_h = 0.0025 (0.025 of the sds' unit), and
    ``hp.lmm``'s search from 0.05 of it ended at theta = (0, 0), 0.38 above (the fifty-fifth session).  The lowest of
    these points, where it is lower than the boundary's criterion, starts a search that cannot step onto it
    (:func:`hierpool.closedform.optimize.optimize_theta`).  ``hp.fit_batch``'s Newton search (curvature-aware, from
    its own start) reached those minima without it: taken among its other minima's starts too, it changed none of
    840 such fits (the same session), and it is not.
    """
    theta = np.asarray(theta, dtype=float)
    scales = _units_of(theta, scales)
    out = []
    for j in _diagonals_at_zero(theta, ks, at_most):
        points = np.repeat(theta[None, :], BOUNDARY_AXIS_SCAN.size, axis=0)
        points[:, j] = BOUNDARY_AXIS_SCAN * scales[j]
        out.append(points)
    return out


#: Prior weights (or known residual sds' inverse squares) spread at least this much (the largest over the smallest,
#: within a dataset) make a vector or several-term model search again from :func:`other_minimum_starts`
#: (:func:`weights_uneven`).  Below it no second minimum was found (260 datasets of ``(1 + x | g)`` and ``(1 | g) + (1
#: | b)`` with weights 10^U(-1, 1)); from 10^U(-1.5, 1.5) on, 0.5-7% of such datasets had one (benchmarks/RESULTS.md,
#: fortieth session, where the searches' cost is measured too).
UNEVEN_WEIGHTS_RATIO = 100.0


def weights_uneven(weights, groups=None, n_groups: int = 1) -> np.ndarray:
    """Whether the positive ``weights`` of each group (``groups``: each weight's group, 0 .. n_groups - 1; None: one
    group) spread at least :data:`UNEVEN_WEIGHTS_RATIO`, largest over smallest: (n_groups,) bool."""
    weights = np.asarray(weights, dtype=float)
    groups = np.zeros(weights.size, dtype=np.int64) if groups is None else np.asarray(groups, dtype=np.int64)
    smallest, largest = segment_extremes(weights, groups, n_groups)
    with np.errstate(invalid="ignore"):  # (a group without weights: -inf against inf, False)
        return largest >= UNEVEN_WEIGHTS_RATIO * smallest


#: How much lower (relative to max(1, |criterion|)) a search from one of :func:`other_minimum_starts` (or of
#: :func:`boundary_probes`, ``hp.lmm``'s boundary restarts) must end than the optimum it started from to replace it
#: (``hp.lmm``'s and ``hp.fit_batch``'s rule): rounding alone does not.
OTHER_MINIMUM_MARGIN = 1e-10


def other_minimum_starts(theta: np.ndarray, ks: tuple[int, ...], at_most: float = 0.0,
                         scales=None) -> list[np.ndarray]:
    """Starts from which a search may reach another minimum of the criterion than its optimum ``theta``: the
    :func:`boundary_probes` of a boundary optimum and its :func:`other_face_starts`, and from an interior one its
    boundary, each term alone moved onto it (a vector term rank-reduced, :func:`rank_reduced_theta`; a scalar term
    at 0).

    With prior weights (or known residual sds) far from equal, a vector or several-term model's criterion can have
    an interior minimum and one on the boundary, and which one a search reaches depends on where it starts:
    ``y ~ x + (1 + x | g)``, 8 groups of 5 rows, weights 10^U(-2, 2), ML, ended in another minimum than ``hp.lmm``'s
    in 5 of 100 ``hp.fit_batch`` datasets, 0.9-2.3 apart, lower in one, and lme4 in 3 of those 5 another than the
    lowest (benchmarks/RESULTS.md, fortieth session).  ``hp.lmm`` and ``hp.fit_batch`` (its host search and its
    compiled programs) search again from these starts where the weights are uneven (:func:`weights_uneven`), each
    with its own optimizer, and keep the lowest optimum, so that both reach the lower of the two minima more often;
    not always (a rank-one face can hold two minima of its own, and two optimizers can leave one start for different
    minima).  AR(1) fits do not.  ``scales``: :func:`boundary_probes`'.
    """
    theta = np.asarray(theta, dtype=float)
    probes = boundary_probes(theta, ks, at_most, scales)
    if probes:
        return probes + other_face_starts(theta, ks, at_most, scales)
    starts, offset = [], 0
    for j, k in enumerate(ks):
        size = k * (k + 1) // 2
        if k > 1:
            starts.append(rank_reduced_theta(theta, ks, terms=(j,)))
        else:
            start = theta.copy()
            start[offset] = 0.0
            starts.append(start)
        offset += size
    return [start for start in starts if np.all(np.isfinite(start))]


def other_face_starts(theta: np.ndarray, ks: tuple[int, ...], at_most: float = 0.0, scales=None) -> list[np.ndarray]:
    """Where an optimum ``theta`` has some terms on the boundary (a diagonal element of T_j at 0, at most
    ``at_most``) and others off it: per term off it, theta with that term moved onto it (a scalar's theta to 0, a
    vector term rank-reduced, :func:`rank_reduced_theta`) and the elements at 0 set inside, at each of
    :data:`BOUNDARY_PROBE_VALUES` and at the moved term's size (its largest diagonal element over its unit), times
    their ``scales`` entries (1 by default): the other face's side, three starts a term.

    With uneven known residual sds, ``y ~ x + (1 | g) + (1 | h)`` (8 studies of one row each, sds 0.002 to 8) had
    its ML minima on the two faces, (theta_g, theta_h) = (0.14, 0) and (0, 0.55), 5.6 apart, the criterion rising
    between them along each axis: ``hp.fit_batch``'s search ended on the higher, and no probe of its boundary
    (:func:`boundary_probes`, on the face it was on) left it; with the moved term's size alone, a search from the
    other face of another dataset ended at (1.08, 0) after its first passes, where the lowest minimum was (0, 0)
    (the fifty-sixth session).  Empty where no term is at 0, or none off it."""
    theta = np.asarray(theta, dtype=float)
    zero = _diagonals_at_zero(theta, ks, at_most)
    if not zero.size:
        return []
    units = _units_of(theta, scales)
    starts, offset = [], 0
    for j, k in enumerate(ks):
        rows, cols = tril_positions(k)
        diagonal = offset + np.flatnonzero(rows == cols)
        if not np.isin(diagonal, zero).any():
            moved = rank_reduced_theta(theta, ks, terms=(j,)) if k > 1 else theta.copy()
            if k == 1:
                moved[offset] = 0.0
            # the zero elements at each probe value and at the moved term's size, in their own units (its variance
            # moved to the other face)
            for size in (*BOUNDARY_PROBE_VALUES, np.max(theta[diagonal] / units[diagonal])):
                start = moved.copy()
                start[zero] = size * units[zero]
                if np.all(np.isfinite(start)):
                    starts.append(start)
        offset += len(rows)
    return starts


def theta_start(ks: tuple[int, ...]) -> np.ndarray:
    """lme4's starting value: T_j = I for every term."""
    starts = []
    for k in ks:
        rows, cols = tril_positions(k)
        starts.append((rows == cols).astype(float))
    return np.concatenate(starts)


def theta_to_factors(theta: jax.Array, ks: tuple[int, ...]) -> list[jax.Array]:
    """Split theta into the lower-triangular k_j x k_j factors T_j (NumPy in, NumPy out; on the host, leading axes
    of theta (many thetas) give factors (..., k_j, k_j))."""
    xp = array_namespace(theta)
    factors = []
    offset = 0
    for k in ks:
        rows, cols = tril_positions(k)
        size = len(rows)
        if xp is np:
            factor = np.zeros(theta.shape[:-1] + (k, k), dtype=theta.dtype)
            factor[..., rows, cols] = theta[..., offset : offset + size]
        else:
            factor = jnp.zeros((k, k), theta.dtype).at[rows, cols].set(theta[offset : offset + size])
        factors.append(factor)
        offset += size
    return factors


def factor_gradients_to_theta(gradients) -> np.ndarray:
    """The gradient with respect to theta from gradients with respect to each full factor T_j.

    theta's entries are T_j's lower triangles (column-major), so its gradient is the
    gradient of T_j at those positions.  Leading axes of the gradients (..., k_j, k_j) are kept.
    """
    xp = array_namespace(*gradients)
    pieces = [g[(..., *tril_positions(g.shape[-1]))] for g in gradients]
    return xp.concatenate(pieces, axis=-1) if pieces else xp.zeros(0)


def factors_to_theta(factors) -> jax.Array:
    """Inverse of :func:`theta_to_factors`; factors (..., k_j, k_j) give theta (..., sum_j k_j (k_j + 1) / 2)."""
    xp = array_namespace(*factors)
    # static slices, not one gather: inside the NUTS potential a gather's gradient is a scatter
    entries = [factor[..., i, j] for factor in factors for i, j in zip(*tril_positions(factor.shape[-1]))]
    return xp.stack(entries, axis=-1)


#: Matrices up to this size are factored by unrolled scalar code, not LAPACK calls.
UNROLL_MAX_SIZE = 6


# Small matrices as k x k nested lists of equally shaped arrays ("entries"): entries[i][j][...]
# is element (i, j) of a whole stack of matrices, so the unrolled algebra below is elementwise
# arithmetic over the stack that XLA fuses into a few loops, with no small dot or stack ops.


def distinct_columns(u: np.ndarray):
    """(the first of each set of equal columns of ``u`` (A, Q, ...), each column's position among those): the columns
    (points) of a stack that hold the same values, to compute what depends on them once (a forward difference's
    probes in another parameter).  NaN never equals itself here: such a column is its own."""
    first, column = equal_sets([u[:, q] for q in range(u.shape[1])])
    return np.array(first), column


def equal_sets(values: list) -> tuple[list[int], np.ndarray]:
    """(the index of the first of each set of equal arrays of ``values``, each array's position among those firsts):
    :func:`distinct_columns`' rule (NaN never equal), an array compared whole only where its leading entries
    agree (a long frame's columns: one comparison of 18 million rows each)."""
    first: list[int] = []
    position = np.empty(len(values), dtype=np.int64)
    for q, value in enumerate(values):
        match = next((i for i, f in enumerate(first) if np.array_equal(values[f][:1], value[:1])
                      and np.array_equal(values[f], value)), None)
        if match is None:
            first.append(q)
            match = len(first) - 1
        position[q] = match
    return first, position


def shared_factor(levels) -> bool:
    """Whether terms whose rows' levels are ``levels`` (one integer array per term) have the same level on every row
    (one grouping factor: ``(1 + x || g)``): a host search may then fit them as one term of their summed width whose
    factor is block-diagonal with theirs (:func:`block_diagonal_positions`)."""
    return all(np.array_equal(level, levels[0]) for level in levels[1:])


def block_diagonal_positions(ks) -> np.ndarray:
    """Where the thetas of terms of widths ``ks`` (each its lower triangle in :func:`tril_positions`' order, the terms
    in turn) stand in the theta of one term of sum(ks) coefficients whose relative factor is block-diagonal with
    the terms' factors: terms on one grouping factor fitted as one (``(1 + x || g)``), the other entries zero."""
    k = sum(ks)
    rows, cols = tril_positions(k)
    position = {(int(i), int(j)): n for n, (i, j) in enumerate(zip(rows, cols))}
    out, offset = [], 0
    for width in ks:
        out += [position[(offset + int(i), offset + int(j))] for i, j in zip(*tril_positions(width))]
        offset += width
    return np.array(out, dtype=np.int64)


def block_diagonal_theta(theta: np.ndarray, ks) -> np.ndarray:
    """The theta (..., k(k+1)/2) of one term of k = sum(ks) coefficients whose factor is block-diagonal with the
    factors of the terms of widths ``ks`` (their thetas ``theta`` (..., sum_j k_j(k_j+1)/2)), zero off the blocks
    (:func:`block_diagonal_positions`); NumPy, any dtype (complex steps too)."""
    k = sum(ks)
    out = np.zeros(theta.shape[:-1] + (k * (k + 1) // 2,), dtype=theta.dtype)
    out[..., block_diagonal_positions(ks)] = theta
    return out


def term_results(b, cond_var, factors, ks) -> tuple[list, list, list]:
    """Each term's part of the results of one term that stands for terms of widths ``ks`` on one factor
    (:func:`block_diagonal_positions`): its columns of the BLUPs ``b`` (..., sum(ks)), and its diagonal blocks of the
    conditional variances ``cond_var`` and of the factors ``factors`` (..., sum(ks), sum(ks)); a list over the terms
    of each (one term's arrays in a list of one where ``ks`` has one width)."""
    offsets = np.concatenate([[0], np.cumsum(ks)]).astype(int)
    spans = list(zip(offsets[:-1], offsets[1:]))
    b, cond_var, factors = np.asarray(b), np.asarray(cond_var), np.asarray(factors)
    return ([b[..., i:j] for i, j in spans], [cond_var[..., i:j, i:j] for i, j in spans],
            [factors[..., i:j, i:j] for i, j in spans])


def entries_of(a: jax.Array) -> list[list[jax.Array]]:
    """(..., k, k) -> k x k entries of shape (...)."""
    size = a.shape[-1]
    return [[a[..., i, j] for j in range(size)] for i in range(size)]


def stack_entries(entries, zero) -> jax.Array:
    """Inverse of :func:`entries_of`; ``None`` entries (above a triangle's diagonal) become ``zero``."""
    xp = array_namespace(zero, *(x for row in entries for x in row))
    return xp.stack([xp.stack([zero if x is None else x for x in row], axis=-1) for row in entries], axis=-2)


def sum_of(terms):
    """The sum of arrays (None for none): Python's ``sum`` adds them to 0, an extra op per sum in a traced program."""
    terms = list(terms)
    return functools.reduce(operator.add, terms) if terms else None


def minus_sum_of(a, terms):
    """``a - sum(terms)``, just ``a`` when there are no terms."""
    total = sum_of(terms)
    return a if total is None else a - total


def _broadcast_to_rank(x: jax.Array, like: jax.Array) -> jax.Array:
    """x (...) with trailing axes added to broadcast against like (..., extra)."""
    return x.reshape(x.shape + (1,) * (np.ndim(like) - np.ndim(x)))


def cholesky_entries(a) -> list[list]:
    """Lower Cholesky factor of the matrices in ``a`` (entries; only the lower triangle is read)."""
    size = len(a)
    xp = array_namespace(a[0][0])
    chol: list[list] = [[None] * size for _ in range(size)]
    for j in range(size):
        chol[j][j] = xp.sqrt(minus_sum_of(a[j][j], (chol[j][m] ** 2 for m in range(j))))
        for i in range(j + 1, size):
            chol[i][j] = minus_sum_of(a[i][j], (chol[i][m] * chol[j][m] for m in range(j))) / chol[j][j]
    return chol


def tri_inverse_entries(lower) -> list[list]:
    """Inverse of lower-triangular matrices given as entries (``None`` above the diagonal)."""
    size = len(lower)
    inv: list[list] = [[None] * size for _ in range(size)]
    for j in range(size):
        inv[j][j] = 1.0 / lower[j][j]
        for i in range(j + 1, size):
            inv[i][j] = -sum_of(lower[i][m] * inv[m][j] for m in range(j, i)) / lower[i][i]
    return inv


def forward_solve_entries(lower, rhs: list) -> list:
    """x with L x = rhs for lower-triangular entries L; ``rhs[i]`` of shape (...) or (..., extra)."""
    x: list = []
    for i, b in enumerate(rhs):
        partial = minus_sum_of(b, (_broadcast_to_rank(lower[i][m], b) * x[m] for m in range(i)))
        x.append(partial / _broadcast_to_rank(lower[i][i], b))
    return x


def _cholesky_unrolled(a: jax.Array) -> jax.Array:
    return stack_entries(cholesky_entries(entries_of(a)), array_namespace(a).zeros_like(a[..., 0, 0]))


def _tri_inverse_unrolled(lower: jax.Array) -> jax.Array:
    entries = [[lower[..., i, j] if j <= i else None for j in range(lower.shape[-1])] for i in range(lower.shape[-1])]
    return stack_entries(tri_inverse_entries(entries), array_namespace(lower).zeros_like(lower[..., 0, 0]))


def _cholesky_by_columns(a: np.ndarray) -> np.ndarray:
    """L with L L^T = a (no conjugation), column by column: the analytic continuation of the
    real factor, so complex-step derivatives (:func:`hierpool.algebra.one_term.value_and_gradient`)
    pass through it."""
    size = a.shape[-1]
    lower = np.zeros_like(a)
    for j in range(size):
        row = lower[..., j, :j]
        pivot = np.sqrt(a[..., j, j] - np.sum(row * row, axis=-1))
        lower[..., j, j] = pivot
        below = a[..., j + 1 :, j] - np.einsum("...im,...m->...i", lower[..., j + 1 :, :j], row)
        lower[..., j + 1 :, j] = below / pivot[..., None]
    return lower


def cholesky(a: jax.Array) -> jax.Array:
    """Lower Cholesky factor(s) of SPD matrices, shape (..., k, k).

    Up to ``UNROLL_MAX_SIZE`` rows the factorization is written out as scalar
    arithmetic that XLA fuses into one kernel: for the thousands of tiny blocks
    of a random-slope model, and for the many small models of a batch or an
    MCMC run, a LAPACK call per (batch of) block(s) costs far more than the
    arithmetic.
    """
    xp = array_namespace(a)
    if a.shape[-1] == 0:  # no columns (a model with one term and no fixed effects has an empty rest)
        return a
    if a.shape[-1] == 1:
        return xp.sqrt(a)
    if xp is np and np.iscomplexobj(a):  # LAPACK's is Hermitian (L L^H); the complex step needs L L^T
        return _cholesky_by_columns(a)
    if xp is np:  # on the host one batched LAPACK call beats the unrolled arithmetic
        try:
            return np.linalg.cholesky(a)
        except np.linalg.LinAlgError:
            if a.ndim == 2:
                raise
            # a stack (a batch's datasets): NaN for the matrices that are not positive definite, each on its own,
            # as the compiled factor gives, where NumPy refuses the whole stack; the others by LAPACK, so that a
            # matrix's factor does not depend on its neighbours
            with np.errstate(invalid="ignore", divide="ignore"):
                out = _cholesky_by_columns(a)
            definite = np.all(np.diagonal(out, axis1=-2, axis2=-1) > 0, axis=-1)  # the compiled path's test
            try:
                out[definite] = np.linalg.cholesky(a[definite])
            except np.linalg.LinAlgError:  # a pivot at rounding's edge, which the two orders decide differently
                for index in zip(*np.nonzero(definite)):
                    try:
                        out[index] = np.linalg.cholesky(a[index])
                    except np.linalg.LinAlgError:
                        pass  # that matrix keeps its column-by-column factor
            return out
    if a.shape[-1] <= UNROLL_MAX_SIZE:
        return _cholesky_unrolled(a)
    return xp.linalg.cholesky(a)


#: On the host, triangular matrices up to this size are inverted (and solved) by NumPy's LU routines rather
#: than by SciPy's trtri and trsm: 6x trtri's flops, a small cost at this size (timed in
#: benchmarks/RESULTS.md), while a fit whose dense blocks stay below it imports no scipy.linalg, which
#: costs more than such a fit.
NUMPY_INVERSE_MAX_SIZE = 128


def tri_inverse(lower: jax.Array) -> jax.Array:
    """Inverses of lower-triangular matrices, shape (..., k, k) (unrolled when small, as :func:`cholesky`)."""
    k = lower.shape[-1]
    if k == 0:
        return lower
    if k == 1:
        return 1.0 / lower
    if array_namespace(lower) is np:
        if lower.ndim == 2 and k > NUMPY_INVERSE_MAX_SIZE and not np.iscomplexobj(lower):
            return _trtri_host(lower)
        # a zero pivot gives NaN, as trtri and the compiled solves do (LU would pivot past it to garbage)
        zero_pivot = _zero_pivots(lower)[..., None, None]
        # a stack: the written-out inverse of small blocks, far faster than LAPACK's per block (benchmarks/RESULTS.md,
        # "The GLMM class on the host"), and of larger ones by halves, whose products are stacked matmuls; a short
        # stack of larger ones by trtri, one call each
        if lower.ndim > 2:
            short = 0 < lower.size <= TRTRI_LOOP_MAX_STACK * k * k
            if short and TRTRI_LOOP_MIN_SIZE <= k <= HOST_SINGLE_THREAD_MAX_SIZE and not np.iscomplexobj(lower):
                return _trtri_stack(lower)
            with np.errstate(divide="ignore", invalid="ignore"):
                return np.where(zero_pivot, np.nan, _tri_inverse_by_halves(lower))
        inverse = np.tril(np.linalg.inv(identity_where_not(~zero_pivot[..., 0, 0], lower)))
        return np.where(zero_pivot, np.nan, inverse)  # the inverse of a lower-triangular matrix is lower-triangular
    if k <= UNROLL_MAX_SIZE:
        return _tri_inverse_unrolled(lower)
    eye = jnp.broadcast_to(jnp.eye(k, dtype=lower.dtype), lower.shape)
    return jax.scipy.linalg.solve_triangular(lower, eye, lower=True)


#: Stacks of at most this many triangular matrices of :data:`TRTRI_LOOP_MIN_SIZE` to
#: :data:`HOST_SINGLE_THREAD_MAX_SIZE` rows are inverted on the host by LAPACK's trtri, one call per matrix, rather
#: than by halves: the halves' recursion is a fixed run of NumPy calls whatever the stack's length, which a short
#: stack (a secant search's passes evaluate one point per dataset) does not repay.  Timed from 7 to 100 rows in
#: benchmarks/RESULTS.md, twenty-fifth session.
TRTRI_LOOP_MAX_STACK = 32
#: Below this size the halves are as fast as :data:`TRTRI_LOOP_MAX_STACK` trtri calls or faster (the same table).
TRTRI_LOOP_MIN_SIZE = 12


def _trtri_stack(lower: np.ndarray) -> np.ndarray:
    """Inverses of a stack of lower-triangular matrices (..., k, k) by LAPACK's trtri, one call each (NaN for a
    matrix with a zero pivot, as :func:`_trtri_host`; up to :data:`HOST_SINGLE_THREAD_MAX_SIZE` rows trtri keeps to
    the calling thread)."""
    import scipy.linalg.lapack

    flat = lower.reshape((-1,) + lower.shape[-2:])
    (trtri,) = scipy.linalg.lapack.get_lapack_funcs(("trtri",), (flat[0],))
    out = np.empty(flat.shape, dtype=trtri.dtype)
    for index, matrix in enumerate(flat):
        inverse, info = trtri(matrix, lower=1)
        out[index] = inverse if info == 0 else np.nan
    # trtri leaves the upper triangle as it found it: zeroed by one product with the stack, where np.tril a matrix
    # cost 60% of the calls' time (a NaN of a failed matrix stays NaN)
    out *= np.tri(flat.shape[-1], dtype=bool)
    return out.reshape(lower.shape)


def _tri_inverse_by_halves(lower: np.ndarray) -> np.ndarray:
    """Inverses of a stack of lower-triangular matrices (..., k, k) on the host, by halves down to the written-out
    kernel: with L = [[A, 0], [C, D]], L^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]].

    NumPy's ``inv`` runs an LU factorization and k solves per matrix of the stack; the halves' products are stacked
    matmuls, several times faster on a batch's stacks (timed in benchmarks/RESULTS.md, "The several-term linear
    class, eighteenth session").
    """
    k = lower.shape[-1]
    if k <= UNROLL_MAX_SIZE:
        return _tri_inverse_unrolled(lower)
    half = k // 2
    first = _tri_inverse_by_halves(lower[..., :half, :half])
    second = _tri_inverse_by_halves(lower[..., half:, half:])
    out = np.zeros(lower.shape, dtype=np.result_type(first, second))  # an integer stack's inverse is not integer
    out[..., :half, :half] = first
    out[..., half:, half:] = second
    out[..., half:, :half] = -(second @ (lower[..., half:, :half] @ first))
    return out


def scale_columns(matrix: jax.Array, blocks, transpose: bool = False) -> jax.Array:
    """``matrix @ blockdiag(I_ell (x) F)`` without forming it, F = T (or T^T with ``transpose``).

    ``blocks`` lists (ell, k, T) for consecutive column blocks; T None means identity.  The factors' leading axes
    (..., k, k) broadcast against those of ``matrix`` (..., rows, columns), of which they have no more (a batch of
    systems on the host).
    """
    xp = array_namespace(matrix)
    pieces = []
    offset = 0
    lead = matrix.shape[:-1]
    for ell, k, factor in blocks:
        piece = matrix[..., offset : offset + ell * k]
        if factor is not None and k == 1:
            piece = piece * (factor[..., 0, :1] if matrix.ndim == 1 else factor[..., :1, :1])
        elif factor is not None:
            # the rows and levels as one axis: one matmul per leading index, where (rows, ell) @ (k, k) per row is a
            # loop of tiny products in NumPy (slower on a batch's stacks: benchmarks/RESULTS.md, "The several-term
            # linear class, eighteenth session"); a vector (no rows axis) is one row
            right = xp.swapaxes(factor, -1, -2) if transpose else factor
            rows = (lead or (1,))[-1] * ell
            piece = (piece.reshape(lead[:-1] + (rows, k)) @ right).reshape(lead + (ell * k,))
        pieces.append(piece)
        offset += ell * k
    return xp.concatenate(pieces, axis=-1)


#: Multiply-adds up to which OpenBLAS runs a gemm on the calling thread (m n k <= 65536 * 4, its
#: ``interface/gemm.c``); :func:`host_product` keeps every call at or below it.
SINGLE_THREAD_GEMM = 2**18


#: Inner widths j up to which :func:`block_product` forms a stack of (i x j) @ (j x 1) (or (1 x j) @ (j x k)) products
#: on the host as j elementwise products, from :data:`BLOCK_PRODUCT_MIN_ENTRIES` entries of ``a``.
BLOCK_PRODUCT_MAX_INNER = 4
#: The size of ``a`` from which the elementwise form pays: below it NumPy's per-call overheads outweigh its matmul's
#: per-block loop (timed in benchmarks/RESULTS.md, twenty-third session).
BLOCK_PRODUCT_MIN_ENTRIES = 1024


def block_product(a, b):
    """``a @ b`` over stacks of blocks (..., i, j) @ (..., j, k); on the host, where j = 1, the elementwise product
    a * b, the same numbers: NumPy's matmul loops once per block, and a stack of many small blocks (a batch's coupling
    cells with one-column terms) spends its time in that loop (benchmarks/RESULTS.md, "The GLMM class, sixteenth
    session").  Likewise a large stack of matrix-vector products (k = 1 or i = 1) with a narrow inner width j
    (:data:`BLOCK_PRODUCT_MAX_INNER`): the sum of j broadcast products, equal to rounding (a batch's coupling cells of a
    slope term's levels with a one-column term's)."""
    if array_namespace(a, b) is np:
        inner = a.shape[-1]
        if inner == 1 and b.shape[-2] == 1:
            return a * b
        if (inner <= BLOCK_PRODUCT_MAX_INNER and b.shape[-2] == inner and (b.shape[-1] == 1 or a.shape[-2] == 1)
                and a.size >= BLOCK_PRODUCT_MIN_ENTRIES):
            out = a[..., :, :1] * b[..., :1, :]
            for j in range(1, inner):
                out = out + a[..., :, j : j + 1] * b[..., j : j + 1, :]
            return out
    return a @ b


def host_product(a: np.ndarray, b: np.ndarray, transpose_a: bool = False) -> np.ndarray:
    """``a @ b`` (``a.T @ b`` with ``transpose_a``) as gemm calls small enough to stay on the calling thread.

    The rows of ``a`` (its summed rows with ``transpose_a``) are taken in chunks.  OpenBLAS
    threads a larger gemm, and its worker threads then spin between calls: on a machine whose
    cores are shared, the host criterion's many small products then cost far more (measured in
    benchmarks/RESULTS.md, 2026-12-01, "Host multi-term fits"); on one core they run at full speed.
    Never forms ``x.T @ x`` of one buffer (NumPy hands that to syrk, which OpenBLAS always threads).
    """
    if b is a:
        b = b.copy()  # one buffer would go to syrk, which OpenBLAS threads at any size
    inner = b.shape[1] * (a.shape[1] if transpose_a else b.shape[0])
    rows = max(1, SINGLE_THREAD_GEMM // max(inner, 1))
    if rows >= a.shape[0]:
        return a.T @ b if transpose_a else a @ b
    if transpose_a:
        out = a[:rows].T @ b[:rows]
        for start in range(rows, a.shape[0], rows):
            out += a[start : start + rows].T @ b[start : start + rows]
        return out
    out = np.empty((a.shape[0], b.shape[1]), dtype=np.result_type(a, b))
    for start in range(0, a.shape[0], rows):
        np.matmul(a[start : start + rows], b, out=out[start : start + rows])
    return out


def logdet_from_cholesky_diagonal(diagonal: jax.Array, axis=None) -> jax.Array:
    """log det(L L^T) from the diagonal of L (summed over ``axis``, default all: leading axes of a batch keep theirs
    with ``axis=-1``)."""
    xp = array_namespace(diagonal)
    return 2.0 * xp.sum(xp.log(diagonal), axis=axis)


# Below this size two triangular solves are as fast as a host LAPACK call and vmap well.
_LAPACK_INVERSE_MIN_SIZE = 256


def _inverse_by_solves(chol: jax.Array) -> jax.Array:
    eye = jnp.eye(chol.shape[-1], dtype=chol.dtype)
    inverse_factor = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    # two solves beat one solve and a product (measured)
    return jax.scipy.linalg.solve_triangular(chol, inverse_factor, lower=True, trans="T")


#: Up to this size LAPACK's trtri and gemm products keep to the calling thread in OpenBLAS, whose potri and
#: trtrs wake its worker threads at any size (see :func:`host_product` for why that matters).
HOST_SINGLE_THREAD_MAX_SIZE = 128


def _trtri_host(lower: np.ndarray) -> np.ndarray:
    """Inverse of one lower-triangular matrix by LAPACK's trtri (NaN for a zero pivot, as :func:`_potri_host`)."""
    return _trtri_stack(lower[None])[0]


def spd_inverse_from_inverse_factor(inverse_factor: np.ndarray) -> np.ndarray:
    """(L L^T)^-1 = L^-T L^-1 from L^-1 on the host, symmetric (the product's two triangles round differently).
    Leading axes: a stack of them."""
    if inverse_factor.ndim > 2:
        product = np.swapaxes(inverse_factor, -1, -2) @ inverse_factor
        return 0.5 * (product + np.swapaxes(product, -1, -2))
    product = host_product(inverse_factor, inverse_factor.copy(), transpose_a=True)  # a copy: not syrk
    return 0.5 * (product + product.T)


def _potri_host(chol: np.ndarray) -> np.ndarray:
    """LAPACK potri on the host; the lower triangle of the result is the inverse."""
    import scipy.linalg.lapack

    upper = np.asarray(chol).T  # U = L^T is Fortran-ordered: LAPACK takes it without a copy
    (potri,) = scipy.linalg.lapack.get_lapack_funcs(("potri",), (upper,))
    inverse, info = potri(upper, lower=0)
    if info != 0:  # a zero pivot: NaN, as the triangular solves would give, not a partial result
        return np.full(upper.shape, np.nan, dtype=upper.dtype)
    return inverse.T  # C-ordered view; its lower triangle holds the inverse


def spd_inverse_from_cholesky(chol: jax.Array) -> jax.Array:
    """(L L^T)^-1 from the lower Cholesky factor L of an SPD matrix.

    On CPU, for matrices of at least 256 rows, this calls LAPACK's ``potri``
    (n^3 * 2/3 flops, exploiting both triangles) through ``jax.pure_callback``;
    XLA has no such kernel and two triangular solves cost 3x the flops (timed on
    InstEval's 1145 x 1145 block in benchmarks/RESULTS.md, "Closed-form engine" and
    "Measurements the code cites").  On GPU, for small
    matrices and under vmap of small matrices, it is two triangular solves.
    The choice is made when the computation is lowered
    (``jax.lax.platform_dependent``), so the function stays jittable.
    """
    if chol.shape[-1] <= UNROLL_MAX_SIZE:
        inverse_factor = tri_inverse(chol)
        return array_namespace(chol).swapaxes(inverse_factor, -1, -2) @ inverse_factor
    if array_namespace(chol) is np:
        if chol.ndim == 2 and chol.shape[-1] <= HOST_SINGLE_THREAD_MAX_SIZE and not np.iscomplexobj(chol):
            return spd_inverse_from_inverse_factor(tri_inverse(chol))
        if chol.ndim == 2:
            lower = _potri_host(chol)
            return np.where(np.tri(chol.shape[-1], dtype=bool), lower, lower.T)
        return spd_inverse_from_inverse_factor(tri_inverse(chol))  # a stack: NaN for each zero pivot alone
    if chol.ndim != 2 or chol.shape[-1] < _LAPACK_INVERSE_MIN_SIZE:
        return _inverse_by_solves(chol)

    def on_cpu(chol):
        shape = jax.ShapeDtypeStruct(chol.shape, chol.dtype)
        lower = jax.pure_callback(_potri_host, shape, chol, vmap_method="sequential")
        # symmetrize in XLA (fused into the consumer) rather than in numpy
        return jnp.where(jnp.tri(chol.shape[-1], dtype=bool), lower, lower.T)

    return jax.lax.platform_dependent(chol, cpu=on_cpu, default=_inverse_by_solves)


def solve_triangular(a, b, lower: bool = True, trans: str = "N"):
    """x with op(a) x = b, ``a`` triangular: SciPy on NumPy arrays, ``jax.scipy`` otherwise.  On the host a stack
    of them (``a`` (..., k, k), ``b`` (..., k)) is solved at once, NaN for each matrix with a zero pivot."""
    if array_namespace(a, b) is np:
        if a.ndim > 2:
            return _solve_triangular_by_lu(a, b, lower, trans)
        return _solve_triangular_host(a, b, lower, trans)
    return jax.scipy.linalg.solve_triangular(a, b, lower=lower, trans=trans)


def identity_where_not(keep: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """The stack ``matrices`` (..., m, m) with the identity in place of each matrix where ``keep`` (...) is False.

    LAPACK refuses a whole stack for one matrix it cannot factor or invert; with the identity in its place the stack
    goes in one call, and the caller discards that matrix's result (NaN, or its own value) by the same mask."""
    return np.where(keep[..., None, None], matrices, np.eye(matrices.shape[-1], dtype=np.result_type(matrices)))


def small_determinants(a: np.ndarray) -> np.ndarray:
    """det of each matrix of the host stack ``a`` (..., k, k): written out for k <= 2 (a batch's millions of 2 x 2
    per-level blocks, where NumPy's LU per matrix costs far more than the arithmetic: benchmarks/RESULTS.md,
    forty-fifth session), else ``np.linalg.det``."""
    k = a.shape[-1]
    if k == 1:
        return a[..., 0, 0].copy()
    if k == 2:
        return a[..., 0, 0] * a[..., 1, 1] - a[..., 0, 1] * a[..., 1, 0]
    return np.linalg.det(a)


def small_inverses(a: np.ndarray) -> np.ndarray:
    """The inverse of each (invertible) matrix of the host stack ``a`` (..., k, k): the adjugate over the
    determinant for k <= 2 (not a LAPACK call per matrix: :func:`small_determinants`), else ``np.linalg.inv``.  A
    singular matrix gives inf or NaN here where NumPy raises: mask it first (:func:`identity_where_not`)."""
    k = a.shape[-1]
    if k > 2:
        return np.linalg.inv(a)
    if k == 1:
        return 1.0 / a
    out = np.empty_like(a)
    out[..., 0, 0], out[..., 1, 1] = a[..., 1, 1], a[..., 0, 0]
    out[..., 0, 1], out[..., 1, 0] = -a[..., 0, 1], -a[..., 1, 0]
    return out / small_determinants(a)[..., None, None]


def _zero_pivots(a: np.ndarray) -> np.ndarray:
    """Whether each triangular matrix of ``a`` (..., k, k) has a zero on its diagonal (host)."""
    return np.any(np.diagonal(a, axis1=-2, axis2=-1) == 0, axis=-1)


def _solve_triangular_by_lu(a: np.ndarray, b: np.ndarray, lower: bool, trans) -> np.ndarray:
    """op(a) x = b by NumPy's LU, reading only ``a``'s named triangle, as LAPACK does; NaN for a matrix with a zero
    pivot, as trsm and the compiled solves give (LU would pivot past it).  ``a`` one matrix (``b`` a vector or
    columns), or a stack (..., k, k) with one vector (..., k) each."""
    stacked = a.ndim > 2
    if stacked and b.ndim != a.ndim - 1:
        raise ValueError(f"a stack of {a.shape[:-2]} triangular matrices takes one vector each, got b {b.shape}")
    a = np.tril(a) if lower else np.triu(a)
    op = {"N": 0, "T": 1, "C": 2}[trans] if isinstance(trans, str) else int(trans)
    if op:
        a = np.swapaxes(a.conj() if op == 2 else a, -1, -2)
    zero = _zero_pivots(a)
    if not stacked:
        return np.full(np.shape(b), np.nan, dtype=np.result_type(a, b)) if zero else np.linalg.solve(a, b)
    safe = identity_where_not(~zero, a)
    return np.where(zero[..., None], np.nan, np.linalg.solve(safe, b[..., None])[..., 0])


def dataset_cells(blocks: np.ndarray, dataset: np.ndarray, level: np.ndarray) -> np.ndarray:
    """``blocks[dataset, level]`` (blocks (D, ell, ...), one per dataset and level) for every row, on the host: one
    ``take`` of the flattened (dataset, level) cells, which NumPy runs far faster than the two-axis fancy index
    over a batch's rows (benchmarks/RESULTS.md, "The GLMM class, fourteenth session").  Positions in the platform's
    index type."""
    ell = blocks.shape[1]
    cells = np.asarray(dataset, dtype=np.intp) * ell + np.asarray(level, dtype=np.intp)
    return blocks.reshape((-1,) + blocks.shape[2:]).take(cells, axis=0)


def segment_extremes(values: np.ndarray, segments: np.ndarray, num_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """(smallest, largest) of the host ``values`` (N,) over rows with equal ``segments`` (N,): two (num_segments,)
    arrays, inf and -inf for a segment without rows."""
    smallest, largest = np.full(num_segments, np.inf), np.full(num_segments, -np.inf)
    np.minimum.at(smallest, segments, values)
    np.maximum.at(largest, segments, values)
    return smallest, largest


def distinct_block_columns(*blocks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(columns (N, c): the distinct columns of the blocks (each (N, k_i)) side by side (:func:`equal_sets`), each
    block's positions in them): a column equal to an earlier one (a slope on a fixed covariate, an intercept in z
    and X: sleepstudy's z is its X) is kept once, for sums over rows to be taken once.  The first block itself where
    the others add no column and its own are distinct (no copy of the rows)."""
    values = [block[:, b] for block in blocks for b in range(block.shape[1])]
    first, position = equal_sets(values)
    positions = np.split(position, np.cumsum([block.shape[1] for block in blocks])[:-1])
    if first == list(range(blocks[0].shape[1])):
        return blocks[0], positions
    return (np.column_stack([values[f] for f in first]) if first else np.zeros((len(blocks[0]), 0))), positions


def segment_sum(values, segments, num_segments: int, sorted_segments: bool = False, axis: int = 0):
    """Sums of ``values`` (N, ...) over rows with equal ``segments`` (N,): (num_segments, ...).

    ``jax.ops.segment_sum`` in a compiled program; on the host a sorted segment list
    is reduced with ``np.add.reduceat`` and an unsorted one with one ``bincount``
    per trailing column (both far faster than ``np.add.at``).  ``axis``: the summed axis, where ``values`` has
    leading axes (a batch of systems on the host).
    """
    axis = axis % values.ndim
    if axis:
        moved = segment_sum(np.moveaxis(values, axis, 0) if array_namespace(values) is np
                            else jnp.moveaxis(values, axis, 0), segments, num_segments, sorted_segments)
        return array_namespace(moved).moveaxis(moved, 0, axis)
    if array_namespace(values) is not np:
        return jax.ops.segment_sum(values, segments, num_segments=num_segments, indices_are_sorted=sorted_segments)
    out = np.zeros((num_segments,) + values.shape[1:], dtype=values.dtype)
    if not len(segments):
        return out
    # one bincount beats reduceat for a single column; many columns (a batch's systems) want reduceat, when the
    # segments are in order (a batch's shared coupling grid), rather than a bincount per column
    sorted_segments = sorted_segments or (values[0].size > 1 and bool(np.all(segments[1:] >= segments[:-1])))
    if sorted_segments and values[0].size > 1:
        starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
        out[segments[starts]] = np.add.reduceat(values, starts, axis=0)
        return out
    flat = values.reshape(len(values), -1)
    sums = [np.bincount(segments, weights=column, minlength=num_segments) for column in flat.T]
    return np.stack(sums, axis=1).reshape(out.shape) if sums else out


#: OpenBLAS's trsm stays on the calling thread below this many right-hand-side entries (m n < 256 * 4).
_SINGLE_THREAD_TRSM = 1024


def _solve_triangular_host(a: np.ndarray, b: np.ndarray, lower: bool, trans: str) -> np.ndarray:
    """Triangular solve by BLAS trsv / trsm, the right-hand sides in column chunks that keep to the calling thread
    (NumPy's LU solve up to :data:`NUMPY_INVERSE_MAX_SIZE` rows).

    SciPy's ``solve_triangular`` calls LAPACK's trtrs, which in OpenBLAS wakes the worker threads
    at any size (see :func:`host_product`).
    """
    if 0 < a.shape[0] <= NUMPY_INVERSE_MAX_SIZE:  # as tri_inverse: a small fit imports no SciPy
        return _solve_triangular_by_lu(a, b, lower, trans)
    import scipy.linalg
    import scipy.linalg.blas

    if np.iscomplexobj(a) or np.iscomplexobj(b) or a.shape[0] == 0:
        return scipy.linalg.solve_triangular(a, b, lower=lower, trans=trans, check_finite=False)
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    # BLAS's trans 2 ("C") is 1 for real matrices
    transposed = {"N": 0, "T": 1, "C": 1}[trans] if isinstance(trans, str) else min(int(trans), 1)
    if not a.flags.f_contiguous:
        # BLAS reads Fortran order, and SciPy would copy a C-ordered ``a`` at every call (each chunk
        # below): hand it the transpose, a Fortran-ordered view, with the triangle and op swapped
        a, lower, transposed = a.T, not lower, 1 - transposed
    if b.ndim == 1:
        (trsv,) = scipy.linalg.blas.get_blas_funcs(("trsv",), (a,))
        return trsv(a, b, lower=int(lower), trans=transposed)
    (trsm,) = scipy.linalg.blas.get_blas_funcs(("trsm",), (a,))
    width = max(1, _SINGLE_THREAD_TRSM // max(a.shape[0], 1) - 1)
    pieces = [trsm(1.0, a, b[:, start : start + width], lower=int(lower), trans_a=transposed)
              for start in range(0, b.shape[1], width)]
    return np.concatenate(pieces, axis=1) if pieces else np.zeros_like(b)


#: Right-hand sides solved at once by :func:`inverse_diagonal` (memory: the matrix's size times this many numbers).
DIAGONAL_CHUNK = 512


def inverse_diagonal(solve, size: int, offset: int = 0, count: int | None = None) -> np.ndarray:
    """diag(B^-1) at rows ``offset`` .. ``offset + count - 1`` (all when ``count`` is None) of a size x size matrix B
    given its ``solve`` (V -> B^-1 V, a factor's), by solving for those unit vectors in chunks of
    :data:`DIAGONAL_CHUNK`: n solves, no dense inverse (a sparse factor's prediction error variances)."""
    count = size - offset if count is None else count
    return inverse_diagonal_at(solve, size, offset + np.arange(count))


def solved_row_quadratic_forms(solve, size: int, n: int, columns, values, lead: np.ndarray | None = None,
                               measured: int | None = None) -> np.ndarray:
    """v_i' B^-1 v_i for n vectors v_i of length ``size`` given B's ``solve`` (V -> B^-1 V, a sparse factor's), in
    chunks of :data:`DIAGONAL_CHUNK` right-hand sides: a prediction's error variance from the mixed-model equations
    (Henderson 1975) without the dense inverse.

    v_i holds ``lead[i]`` (n x p) in its first p coordinates, plus ``values[t][i, s]`` at ``columns[t][i, s]`` for
    each block t and slot s (several slots may share a coordinate: they add).  ``measured``: only the first
    ``measured`` coordinates of v_i and B^-1 v_i enter the product (a bordered system's constraint rows do not).
    """
    measured = size if measured is None else measured
    out = np.empty(n)
    for start in range(0, n, DIAGONAL_CHUNK):
        rows = np.arange(start, min(n, start + DIAGONAL_CHUNK))
        rhs = np.zeros((size, rows.size))
        if lead is not None:
            rhs[: lead.shape[1]] = lead[rows].T
        for column, value in zip(columns, values):
            for slot in range(column.shape[1]):
                np.add.at(rhs, (column[rows, slot], np.arange(rows.size)), value[rows, slot])
        out[rows] = np.einsum("ij,ij->j", rhs[:measured], solve(rhs)[:measured])
    return out


def inverse_diagonal_at(solve, size: int, rows: np.ndarray) -> np.ndarray:
    """(B^-1)_ii at each of ``rows`` (:func:`inverse_diagonal` at any rows): one solve per row, in chunks."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty(rows.size)
    for start in range(0, rows.size, DIAGONAL_CHUNK):
        chunk = rows[start:start + DIAGONAL_CHUNK]
        rhs = np.zeros((size, chunk.size))
        rhs[chunk, np.arange(chunk.size)] = 1.0
        out[start:start + chunk.size] = solve(rhs)[chunk, np.arange(chunk.size)]
    return out
