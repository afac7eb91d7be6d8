"""AR(1) residuals by whitening: the linear mixed model with C = AR(1) correlation is an independent-residual one.

Within a series, residuals e_t with Var(e_t) = sigma^2 and Corr(e_t, e_s) = phi^|t - s| (corAR1 at
integer positions, corCAR1 at continuous times) are a Markov chain: given e_(t-1), e_t has mean
c_t e_(t-1) and variance sigma^2 (1 - c_t^2), c_t = phi^(lag_t).  So the rows

    w_1 = v_1,      w_t = (v_t - c_t v_(t-1)) / sqrt(1 - c_t^2)        (Prais & Winsten 1954)

of any column v (y, X's columns, Z's values) are the columns of the same model with independent
residuals of variance sigma^2: W C W^T = I for the bidiagonal W.  The cost is linear in the series'
length (never a dense n x n matrix), and the closed form's system, criterion and Henderson solution
then apply unchanged to the whitened columns.  The likelihood of the original data is that of the
whitened data times |W| (the Jacobian), so

    -2 log L(theta, phi) = -2 log L_whitened(theta) + log |C(phi)|,   log |C| = sum_t log(1 - c_t^2)

for ML and REML alike (REML's log |X^T V^-1 X| is the whitened X's).  A random-effect term keeps one
level per row only if its level does not change within a series (it is the series' group or coarser):
the caller checks that (:func:`hierpool.closedform.ar1.fit_ar1`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from statistics import NormalDist

import numpy as np

from .linalg import array_namespace, cholesky, identity_where_not
from .statistics import BatchStatistics
from .system import fill_in_program, grouped_products

#: The search's interval on the unconstrained scale (:func:`unconstrained_phi`): |phi| up to 1 - 1e-5.
UNCONSTRAINED_LIMIT = 12.0
#: How near an end of that interval an estimate is "at the edge" (hp.lmm warns; the batch fits it alone).
EDGE = 1e-3


def at_edge(u):
    """Whether u (nlme's unconstrained phi: a float, a NumPy or a JAX array) lies at the edge of its range, within
    :data:`EDGE` of +-:data:`UNCONSTRAINED_LIMIT` (hp.lmm warns there; the batch holds u at the end).  NaN: False."""
    return abs(u) >= UNCONSTRAINED_LIMIT - EDGE


def first_u(continuous: bool) -> float:
    """Where the search for phi starts its first fit: phi = 0 (corAR1), or u = -3, phi = 0.047 (corCAR1, whose
    phi = 0 is outside its range)."""
    return -3.0 if continuous else 0.0


#: phi per the user's unit of time is reported and used as a float (a prediction's or simulation's phi^lag): the
#: smallest kept, and the least distance from 1.  Near 1 a float holds phi to 1.1e-16 absolute, so log(phi^lag) to
#: 1.1e-16 / (1 - phi) relative: at least 1 - phi = 1e-10 keeps it to about 1e-6 (readings a day apart with time in
#: seconds keep a correlation up to 0.99999 per day).
PHI_PER_UNIT_RANGE = (1e-300, 1.0 - 1e-10)


def per_unit(psi, unit) -> np.ndarray:
    """phi per the user's unit of time from ``psi`` per the search's ``unit`` (:func:`search_units`): psi^(1/unit);
    NaN where a float cannot hold it to the digits phi^lag needs (outside :data:`PHI_PER_UNIT_RANGE`: readings so
    close in the time's unit that a moderate correlation between them is phi = 1e-400 per unit, or so far apart
    that phi rounds to 1).  Steps (``unit`` 1) keep psi."""
    psi, unit = np.asarray(psi, dtype=float), np.asarray(unit, dtype=float)
    phi = psi ** (1.0 / unit)
    low, high = PHI_PER_UNIT_RANGE
    return np.where((unit == 1.0) | ((phi >= low) & (phi <= high)), phi, np.nan)


def median_lags(previous: np.ndarray, lag: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Each of ``n_groups`` datasets' median lag over its rows with a predecessor (``group``: each row's; the middle
    one of its sorted lags, or the mean of the middle two); 1 for a dataset without such rows."""
    has = previous >= 0
    keys = group[has]
    order = np.lexsort((lag[has], keys))
    counts = np.bincount(keys, minlength=n_groups)
    starts = np.cumsum(counts) - counts
    sorted_lags = np.append(lag[has][order], 1.0)  # (a group without rows reads the appended 1)
    return (sorted_lags[starts + np.maximum(counts - 1, 0) // 2] + sorted_lags[starts + counts // 2]) / 2.0


def search_units(previous: np.ndarray, lag: np.ndarray, group: np.ndarray, n_groups: int,
                 continuous: bool) -> np.ndarray:
    """The unit of time each dataset's search for phi runs in: its median lag in continuous time, 1 in steps.

    u's range (:data:`UNCONSTRAINED_LIMIT`) bounds phi per unit of time, so in the user's unit it would bound the
    correlation at the lags observed by the unit's size: readings 0.01 days apart could not correlate below
    0.886 (phi per day at least 6.1e-6), readings daily with time in seconds not above 0.59.  In the median lag's
    unit it bounds the correlation at that lag, whatever the user's unit: the search whitens with the lags over
    the unit, and phi per the user's unit is its phi to the power 1 / unit (the same c = phi^lag).  Steps (corAR1)
    keep 1: a negative phi has no real root."""
    if not continuous:
        return np.ones(n_groups)
    return median_lags(previous, lag, group, n_groups)


def in_search_units(series, group: np.ndarray, n_groups: int, continuous: bool):
    """(``series``, a dataclass with ``previous`` and ``lag`` per row, with each row's lag over its group's
    :func:`search_units`; those units): what the fits search and the samplers sample in, phi per the median lag."""
    units = search_units(series.previous, series.lag, group, n_groups, continuous)
    return replace(series, lag=series.lag / units[group]), units


def lag_one_phis(residual: np.ndarray, previous: np.ndarray, lag: np.ndarray, group: np.ndarray, n_groups: int,
                 continuous: bool) -> np.ndarray:
    """Where the search for phi starts, for each of ``n_groups`` datasets at once (``group``: each row's;
    ``previous`` indexes the same rows): the correlation of residuals with their predecessors in their series,
    sum r_t r_(t-1) / sqrt(sum r_t^2 sum r_(t-1)^2), kept inside (-0.9, 0.9) (above 0.05 in continuous time), per
    unit of lag (its root of the pairs' lag); 0.1 for a dataset without such rows.

    The pairs: in continuous time every row with a predecessor, the root that of the dataset's median lag; in
    corAR1's steps only the pairs at the dataset's shortest odd lag (its shortest lag where none is odd), whose root
    keeps the correlation's sign: pooled over lags of 1 and 2, a phi of -0.7 correlated pairs positively, and the
    search from there stopped at a local optimum of phi > 0 (log L 5.6 and 13.8 below the optimum, nlme's, on the
    review's series read every second step).  The correlation is kept inside before its root is taken, so that the
    start's phi^lag at that lag is the kept correlation whatever the time's unit: clipped after the root, a time in
    minutes of a correlation over days started at phi^lag = 0.9^1440, where the criterion is flat in phi and a
    search in (theta, u) stops.  The start's u is kept a unit inside that range (a median lag below 1 takes a high
    root: 0.05^100).  The searches pass lags in their own unit (:func:`search_units`), whose median is 1 in
    continuous time; corAR1's steps keep theirs."""
    has = previous >= 0
    if continuous:
        root = median_lags(previous, lag, group, n_groups)
    else:
        root = np.full(n_groups, np.inf)
        odd = has & (lag % 2 == 1)
        np.minimum.at(root, group[odd], lag[odd])
        shortest = np.full(n_groups, np.inf)
        np.minimum.at(shortest, group[has], lag[has])
        root = np.where(np.isfinite(root), root, np.where(np.isfinite(shortest), shortest, 1.0))
        has = has & (lag == root[group])
    r, before, keys = residual[has], residual[previous[has]], group[has]
    sums = [np.bincount(keys, weights=w, minlength=n_groups) for w in (r * before, r * r, before * before)]
    correlation = sums[0] / np.maximum(np.sqrt(sums[1] * sums[2]), 1e-300)
    counts = np.bincount(keys, minlength=n_groups)
    kept = np.clip(correlation, 0.05 if continuous else -0.9, 0.9)
    inside = constrained_phi(np.array([1.0 - UNCONSTRAINED_LIMIT, UNCONSTRAINED_LIMIT - 1.0]), continuous)
    phi = np.clip(np.sign(kept) * np.abs(kept) ** (1.0 / root), *inside)  # a lag below 1 shrinks phi
    return np.where(counts > 0, phi, 0.1)


def sign_in_doubt(previous: np.ndarray, lag: np.ndarray, group: np.ndarray, n_groups: int) -> np.ndarray:
    """Per dataset (``group``: each row's), whether corAR1's pairs at even lags are at least as many as those at odd
    lags: phi^lag of an even lag is the same for phi and -phi, so the criterion in phi may have a second minimum
    across 0, and a search from one side can stop on the wrong one (series read every second step, one pair a
    series one step apart, phi -0.7: the search stopped at phi 0.58, 5.1 above the optimum at -0.75).  Readings
    missed at random leave most pairs one step apart."""
    has = previous >= 0
    odd = has & (lag % 2 == 1)
    even = np.bincount(group[has & ~odd], minlength=n_groups)
    return (even > 0) & (even >= np.bincount(group[odd], minlength=n_groups))


def constrained_phi(u, continuous: bool):
    """phi from nlme's unconstrained coefficient u: tanh(u / 2) (the inverse of log((1 + phi) / (1 - phi)), corAR1),
    or 1 / (1 + exp(-u)) (of log(phi / (1 - phi)), corCAR1).  NumPy or JAX (traced in ``hp.fit_batch``'s search)."""
    xp = array_namespace(u)
    return 1.0 / (1.0 + xp.exp(-u)) if continuous else xp.tanh(u / 2.0)


def unconstrained_phi(phi, continuous: bool):
    """nlme's unconstrained coefficient u of phi, the inverse of :func:`constrained_phi`: log((1 + phi) / (1 - phi))
    (corAR1), or log(phi / (1 - phi)) (corCAR1).  NumPy."""
    phi = np.asarray(phi, dtype=float)
    return np.log(phi / (1.0 - phi)) if continuous else np.log((1.0 + phi) / (1.0 - phi))


#: Normal quantile of a 95% interval (phi's, nlme's Wald interval in u).
Z_95 = NormalDist().inv_cdf(0.975)


def profile_curvature(hessian: np.ndarray) -> np.ndarray:
    """The curvature in u of the criterion profiled over theta, at a joint search's optimum in (theta, u), from its
    Hessians ``hessian`` (..., m + 1, m + 1), u last:

        d^2/du^2 min_theta f(theta, u) = H_uu - H_u,theta H_theta,theta^-1 H_theta,u = 1 / (H^-1)_uu,

    the Schur complement (at the optimum theta's profile moves with u by -H_theta,theta^-1 H_theta,u; Nocedal &
    Wright 2006, sec. 16.1, for the block inverse): the square of the last pivot of H's Cholesky factor, u being
    last.  NaN where H is not positive definite (its factorization fails): there is no minimum in theta to profile
    over, and no interval.  A sign flip of theta's columns (:func:`~hierpool.algebra.search.newton.
    canonical_theta`) leaves it unchanged."""
    hessian = np.asarray(hessian, dtype=float)
    finite = np.all(np.isfinite(hessian), axis=(-2, -1))
    m = hessian.shape[-1]
    # linalg.cholesky of a stack: NaN for each matrix that is not positive definite, one at rounding's edge
    # included (eigvalsh's +1e-16 then LAPACK's refusal raised for the whole chunk)
    with np.errstate(invalid="ignore", divide="ignore"):
        pivots = cholesky(identity_where_not(finite, hessian).reshape(-1, m, m))[:, -1, -1].reshape(finite.shape)
        return np.where(finite & (pivots > 0.0), pivots**2, np.nan)


def clearly_curved(curvature) -> np.ndarray:
    """Whether the profiled criterion's ``curvature`` in u (of -2 log L) at a joint search's estimate identifies
    phi: its 95% Wald interval in u, half-width Z_95 sqrt(2 / curvature), narrower than u's half-range
    (:data:`UNCONSTRAINED_LIMIT`).  A search in (theta, u) that starts on a flat stretch (every c = phi^lag near 0
    or 1) sees no gradient there and stops; where the profile is that flat, a search over u's whole range decides
    (``hp.lmm``'s Brent search, :func:`hierpool.closedform.ar1.fit_ar1`; ``hp.fit_batch`` fits that dataset
    alone).  False where it is NaN."""
    return np.asarray(curvature, dtype=float) > 2.0 * (Z_95 / UNCONSTRAINED_LIMIT) ** 2


def lag_power(phi, lag):
    """phi^lag, a negative phi's as (-1)^lag |phi|^lag (lags then whole: corAR1's steps).

    NumPy's complex power of an integer from 100 up goes through the logarithm, which loses a negative phi's
    complex step (its derivative 5e10 for -2.8e-4 at phi -0.9, lag 100: the review's); the power of -phi, whose real
    part is positive, keeps it.  NumPy or JAX, real or complex (the complex step in phi)."""
    xp = array_namespace(phi, lag)
    negative = xp.real(phi) < 0
    magnitude = xp.power(xp.where(negative, -phi, phi), lag)
    return xp.where(negative & (lag % 2 == 1), -magnitude, magnitude)


def carried(phi, previous, lag):
    """c_t = phi^lag_t (:func:`lag_power`) for rows with a predecessor in their series, 0 for first rows; shape (n,)."""
    xp = array_namespace(phi, lag)
    first = previous < 0
    return xp.where(first, 0.0, lag_power(phi, xp.where(first, 1.0, lag)))


def whiten(values, previous, c):
    """The rows w_t = (v_t - c_t v_(t-1)) / sqrt(1 - c_t^2) of ``values`` (n,) or (n, k)."""
    xp = array_namespace(values, c)
    before = values[xp.maximum(previous, 0)]
    scale = 1.0 / xp.sqrt(1.0 - c * c)
    if values.ndim == 1:
        return scale * (values - c * before)
    return scale[:, None] * (values - c[:, None] * before)


def unwhiten(innovations, previous, c, order):
    """The inverse of :func:`whiten` on a vector (host): e_t = c_t e_(t-1) + sqrt(1 - c_t^2) w_t, computed along
    ``order`` (each series in order, a row's predecessor first).  With standard normal ``innovations`` it draws
    unit-variance AR(1) chains (simulation studies)."""
    out = np.empty(len(innovations))
    scale = np.sqrt(1.0 - c * c)
    for row in order:
        before = previous[row]
        out[row] = innovations[row] if before < 0 else c[row] * out[before] + scale[row] * innovations[row]
    return out


def log_det_correlation(c):
    """log |C| = sum_t log(1 - c_t^2) (the first rows' c_t = 0 add nothing)."""
    xp = array_namespace(c)
    return xp.sum(xp.log1p(-c * c))


def whitened_system(pattern, previous, lag, y_less_offset, phi):
    """The mixed-model system of the data whitened at ``phi``, filled inside a traced program.

    ``pattern`` is :func:`hierpool.algebra.system.system_pattern` of the unwhitened design (its rows'
    levels and values; X is one of its rest blocks); whitening replaces the values (term 0's, the other
    terms' and X's) and the response, and :func:`hierpool.algebra.system.fill_in_program` forms the
    cross-products with unit weights.  The collapsed sampler's marginal likelihood and exact draws read it
    at every phi (:mod:`hierpool.bayesian.model`).
    """
    import dataclasses


    xp = array_namespace(phi, y_less_offset)
    c = carried(phi, previous, lag)
    rows = tuple((index, whiten(values, previous, c)) for index, values in pattern.rest_rows)
    whitened = dataclasses.replace(pattern, z0=whiten(pattern.z0, previous, c), rest_rows=rows)
    return fill_in_program(whitened, xp.ones(y_less_offset.shape[0]), whiten(y_less_offset, previous, c))


def draw_effects_whitened(thetas, sigmas, phis, pattern, previous, lag, y_less_offset, loc, scale, key,
                          batch_size: int):
    """Exact draws of (beta, b) given each (theta, sigma, phi) draw: the conditional draw on the system
    whitened at that draw's phi (:func:`whitened_system`), ``batch_size`` draws at a time."""
    import jax  # (as in whitened_system: the host's whitening imports no JAX)

    from .henderson import conditional_draw, noise_size
    from .marginal import beta_prior_block, map_in_batches

    noise = jax.random.normal(key, (thetas.shape[0], noise_size(pattern.layout)), dtype=thetas.dtype)

    def one(theta, sigma, phi, e):
        system = whitened_system(pattern, previous, lag, y_less_offset, phi)
        return conditional_draw(theta, system, sigma, e, beta_prior_block(loc, scale, sigma, system))

    return map_in_batches(one, (thetas, sigmas, phis, noise), batch_size)


@dataclass(frozen=True)
class LaggedMoments:
    """Per-level cross-products of a one-term model's columns v = [z, X, y] in the form that gives their whitened
    cross-products at any phi (:func:`lagged_moments`, :func:`whitened_cross_products`).  Leading axes
    (datasets, ell levels); each level's rows with a predecessor are grouped by their lag, J classes a level
    (padded with empty ones).

    Attributes
    ----------
    sums : (D, ell, 3 J + 1, r, r)
        per lag class, the sums of d d^T, of d v_-^T + v_- d^T and of v_- v_-^T over its rows (v_- a row's
        predecessor, d = v - v_-), the J classes of each in turn; last, the sum of v v^T over the level's first
        rows (which whiten to themselves).
    lag : (D, ell, J)
        each class's lag (1 where empty).
    count : (D, ell, J)
        each class's number of rows.
    """

    sums: np.ndarray
    lag: np.ndarray
    count: np.ndarray

    def take(self, index) -> LaggedMoments:
        """The moments of datasets ``index`` (the leading axis)."""
        return LaggedMoments(*(getattr(self, f.name)[index] for f in fields(self)))


def lagged_moments(dataset: np.ndarray, level: np.ndarray, columns: np.ndarray, previous: np.ndarray,
                   lag: np.ndarray, n_datasets: int, ell: int) -> LaggedMoments:
    """The :class:`LaggedMoments` of rows (N,) given each row's dataset, level within it (< ``ell``), columns
    (N, r), predecessor in its series (a row index, -1 for a series' first row) and lag.

    A row's whitened values are w = (v - c v_-) / sqrt(1 - c^2) = (d + (1 - c) v_-) / sqrt(1 - c^2), c = phi^lag
    (:func:`whiten`), so a lag class's whitened cross-products are

        (D D + (1 - c) (D V + (D V)^T) + (1 - c)^2 V V) / (1 - c^2)

    from sums formed once.  Written in d = v - v_- rather than v, a column constant within a series (the
    intercept, a level's random effect in y) adds nothing to D D and D V, so the sum does not cancel it away as
    phi nears 1.  Each series must lie within one level (:func:`hierpool.closedform.ar1.check_nested`).
    """
    r = columns.shape[1]
    has = previous >= 0
    before = np.where(has[:, None], columns[np.maximum(previous, 0)], 0.0)
    cell = dataset * ell + level
    ones = np.ones(len(cell))
    n_cells = n_datasets * ell
    # the other rows' lag classes, each cell's numbered from 0; at least one class (an empty one)
    J, lag_of, row_class = lag_classes(cell[has], lag[has], n_cells)
    if J == 0:
        J, lag_of = 1, np.ones((n_cells, 1))
    key = cell[has] * J + row_class  # (cell, class)
    d, v = (columns - before)[has], before[has]
    sums = np.zeros((n_cells, 3 * J + 1, r, r))
    dv = grouped_products(key, d, v, ones[has], n_cells * J)
    blocks = (grouped_products(key, d, d, ones[has], n_cells * J), dv + np.swapaxes(dv, -1, -2),
              grouped_products(key, v, v, ones[has], n_cells * J))
    for block, products in enumerate(blocks):
        sums[:, block * J:(block + 1) * J] = products.reshape(n_cells, J, r, r)
    firsts = columns[~has]
    sums[:, -1] = grouped_products(cell[~has], firsts, firsts, ones[~has], n_cells)
    count = np.bincount(key, minlength=n_cells * J).reshape(n_cells, J).astype(float)
    return LaggedMoments(sums.reshape(n_datasets, ell, 3 * J + 1, r, r), lag_of.reshape(n_datasets, ell, J),
                         count.reshape(n_datasets, ell, J))


def lag_classes(group: np.ndarray, lag: np.ndarray, n_groups: int | None = None):
    """The lag classes of rows that follow another (each row's group and lag), numbered within each group from 0 in
    increasing lag: (J, the most classes a group has, 0 without rows; each class's lag (n_groups, J), 1 where a group
    has fewer, or None without ``n_groups`` (a caller that needs the rows' classes alone: the grid can be far larger
    than the rows where one group has many classes); each row's class).  One integer key a row, sorted once (a
    lexicographic ``unique`` of the (group, lag) pairs sorts far slower)."""
    lags, code = np.unique(lag, return_inverse=True)
    width = max(len(lags), 1)
    classes, pair = np.unique(np.asarray(group, dtype=np.int64) * width + code.reshape(-1), return_inverse=True)
    owner = classes // width
    within = np.arange(len(classes)) - np.searchsorted(owner, owner)
    J = int(within.max()) + 1 if len(classes) else 0
    lag_of = None
    if n_groups is not None:
        lag_of = np.ones((n_groups, J))
        lag_of[owner, within] = lags[classes % width]
    return J, lag_of, within[pair.reshape(-1)]


def whitened_cross_products(moments: LaggedMoments, phi: np.ndarray):
    """Each level's cross-products of the columns whitened at ``phi``, and log |C(phi)|, from the moments (host).

    ``phi`` (D, S): S values per dataset (complex ones too: the complex step in phi).  Returns the cross-products
    (D, S, ell, r, r) and log |C| = sum_t log(1 - c_t^2) (D, S) (:func:`log_det_correlation`).  The rows' own
    whitening (:func:`whiten`) and this give the same numbers (``tests/test_ar1.py``); this costs per level and
    lag class, not per row.
    """
    D, ell, K, r, _ = moments.sums.shape
    S = phi.shape[1]
    c = lag_power(phi[:, :, None, None], moments.lag[:, None])  # (D, S, ell, J)
    # each class's weight, then the first rows' 1: one product per level sums them
    weights = np.moveaxis(lag_class_weights(c), 1, 2)  # (D, ell, S, K)
    products = weighted_sums(weights, moments.sums.reshape(D, ell, K, r * r))  # (D, ell, S, r r)
    cross = np.moveaxis(products, 2, 1).reshape(D, S, ell, r, r)
    log_det = np.einsum("dlj,dslj->ds", moments.count, np.log1p(-c * c))
    return cross, log_det


def lag_class_weights(c):
    """The weights (1, 1 - c, (1 - c)^2) / (1 - c^2) of a lag class's sums of d d^T, of d v_-^T + v_- d^T and of
    v_- v_-^T (:func:`lagged_moments`), c = phi^lag each class's (..., J), the J classes of each in turn, then the
    first rows' weight 1: (..., 3 J + 1).  The whitened cross-products are the sums' combination with them (c of a
    complex-stepped phi from :func:`lag_power`, which keeps a negative phi's step)."""
    one_minus, one_plus = 1.0 - c, 1.0 + c
    # the last two reduced to 1 / (1 + c) and (1 - c) / (1 + c): no 1 - c divided by itself as c nears 1 (a short
    # lag's complex step in corCAR1 keeps its derivative's digits)
    return np.concatenate([1.0 / (one_minus * one_plus), 1.0 / one_plus, one_minus / one_plus,
                           np.ones_like(c[..., :1])], axis=-1)


def weighted_sums(weights: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """``weights @ sums`` for weights (..., S, K) (real, or complex: the complex step in phi) and real sums (..., K,
    E): (..., S, E).  Complex weights' real and imaginary parts are stacked into one real product, since NumPy
    would copy the sums to complex for each call."""
    if not np.iscomplexobj(weights):
        return weights @ sums
    S = weights.shape[-2]
    products = np.concatenate([weights.real, weights.imag], axis=-2) @ sums
    return products[..., :S, :] + 1j * products[..., S:, :]


def whitened_statistics(cross: np.ndarray, k: int, n: np.ndarray, beta_shift: np.ndarray) -> BatchStatistics:
    """The one-term :class:`~hierpool.algebra.statistics.BatchStatistics` of per-level cross-products (..., ell, r,
    r) of [z (k columns), X, y]: the X and y blocks summed over the levels.  ``n`` and ``beta_shift`` broadcast
    against the leading axes (no prior weights: an AR(1) model has none)."""
    total = cross.sum(axis=-3)
    p = cross.shape[-1] - k - 1
    return BatchStatistics(ztz=cross[..., :k, :k], ztx=cross[..., :k, k:k + p], zty=cross[..., :k, k + p],
                           xtx=total[..., k:k + p, k:k + p], xty=total[..., k:k + p, k + p],
                           yty=total[..., k + p, k + p], n=n, log_weights=np.zeros_like(n), beta_shift=beta_shift)
