"""A GLMM's Laplace criterion and gradient over many datasets at once on the host (algebra.laplace_batch) equal one
dataset's host path (algebra.laplace) at each dataset's own point; newton_on_host's lazy shifts take the same steps
as its eager ones; hp.fit_batch's GLMM host path equals its compiled one."""

import numpy as np
import pandas as pd
import pytest
from conftest import host_and_compiled

import hierpool.algebra.search.newton as optimize_module
import hierpool.batch.fit_glmm as fit_glmm_module
from hierpool.algebra.family import family
from hierpool.algebra.henderson import fixed_effects_information, solve
from hierpool.algebra.laplace import (
    conditional_mode,
    fixed_effect_information,
    laplace_and_gradient_on_host,
    mode_solution,
    saturated_deviance,
)
from hierpool.algebra.laplace_batch import (
    GroupedRows,
    conditional_modes,
    fixed_effects_curvature,
    laplace_and_gradient,
    working_system,
)
from hierpool.algebra.search.newton import _finite_difference_hessians, _probe_points, newton_on_host
from hierpool.batch.glmm_search import beta_covariance
from hierpool.spec.design import build_design
from hierpool.spec.family import family_spec


def _crossed(seed, subjects, items=4):
    rng = np.random.default_rng(seed)
    s, i = np.repeat(np.arange(subjects), items), np.tile(np.arange(items), subjects)
    x = rng.normal(size=s.size)
    eta = -0.2 + 0.6 * x + rng.normal(0, 0.9, subjects)[s] + rng.normal(0, 0.5, items)[i]
    return pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "s": s.astype(str),
                         "i": i.astype(str)})


def _slopes(seed, groups, times=5):
    rng = np.random.default_rng(seed)
    g, t = np.repeat(np.arange(groups), times), np.tile(np.arange(times), groups) / times
    exposure = rng.uniform(1, 3, g.size)
    eta = 0.5 + 0.3 * t + np.log(exposure) + rng.normal(0, 0.5, groups)[g] + rng.normal(0, 0.3, groups)[g] * t
    return pd.DataFrame({"y": rng.poisson(np.exp(eta)), "t": t, "g": g.astype(str), "e": exposure})


def _proportions(seed, groups):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(groups), 3)
    x, n = rng.normal(size=g.size), rng.integers(2, 9, g.size)
    k = rng.binomial(n, 1 / (1 + np.exp(-(0.2 + 0.5 * x + rng.normal(0, 0.8, groups)[g]))))
    return pd.DataFrame({"k": k, "n": n, "x": x, "g": g.astype(str)})


def _nested_probit(seed, groups=8):
    rng = np.random.default_rng(seed)
    g, h = np.repeat(np.arange(groups), 12), np.tile(np.repeat(np.arange(3), 4), groups)
    x, n = rng.normal(size=g.size), rng.integers(3, 12, g.size)
    eta = -0.4 + 0.5 * x + rng.normal(0, 0.7, groups)[g] + rng.normal(0, 0.4, 3 * groups)[3 * g + h]
    k = rng.binomial(n, 1 / (1 + np.exp(-eta)))
    return pd.DataFrame({"k": k, "n": n, "x": x, "g": g.astype(str), "h": h.astype(str)})


# (formula, family, link, frames: datasets whose level counts differ, so the batch pads them)
MODELS = {
    "crossed Bernoulli, logit": ("y ~ x + (1 | s) + (1 | i)", "binomial", "logit",
                                 [_crossed(1, 6), _crossed(2, 5), _crossed(3, 6)]),
    "correlated slopes, Poisson with an offset": ("y ~ t + offset(log(e)) + (1 + t | g)", "poisson", "log",
                                                  [_slopes(4, 6), _slopes(5, 4)]),
    "proportions, probit (observed information)": ("cbind(k, n - k) ~ x + (1 | g)", "binomial", "probit",
                                                   [_proportions(6, 7), _proportions(7, 5)]),
}


def _batch(formula, family_name, link, frames):
    spec = family_spec(family_name, link)
    designs = [build_design(formula, frame, family=spec) for frame in frames]
    widths = [max(d.terms[j].n_levels for d in designs) for j in range(len(designs[0].terms))]
    terms = tuple((np.concatenate([d.terms[j].index for d in designs]).astype(np.int64),
                   np.concatenate([d.terms[j].z for d in designs]), widths[j]) for j in range(len(widths)))
    rows = GroupedRows(np.concatenate([np.full(d.n, g) for g, d in enumerate(designs)]), len(designs),
                       np.concatenate([d.y for d in designs]), np.concatenate([d.row_weights for d in designs]),
                       np.concatenate([d.offset for d in designs]), np.concatenate([d.X for d in designs]), terms)
    return designs, rows, family(spec)


def _points(designs, rows, seed):
    rng = np.random.default_rng(seed)
    n_theta = sum(k * (k + 1) // 2 for k in rows.ks)
    theta = np.tile(np.concatenate([np.eye(k)[np.tril_indices(k)] for k in rows.ks]), (len(designs), 1))
    theta = theta * rng.uniform(0.5, 1.2, theta.shape) + 0.1 * rng.normal(size=theta.shape) * (theta == 0)
    beta = rng.normal(0, 0.3, (len(designs), designs[0].p))
    assert theta.shape[1] == n_theta
    return theta, beta


def test_grouped_rows_of_every_dataset_or_one_copy_are_the_rows_themselves_and_others_are_taken():
    _, rows, _ = _batch(*MODELS["crossed Bernoulli, logit"])  # three datasets
    assert rows.subset(np.arange(rows.n_groups))[0] is rows and rows.repeated(1) is rows
    part, taken = rows.subset(np.array([0, 2]))
    np.testing.assert_array_equal(taken, np.flatnonzero(rows.group != 1))
    twice = part.repeated(2)
    for name in ("y", "trials", "offset", "X"):
        np.testing.assert_array_equal(getattr(part, name), getattr(rows, name)[taken])
        np.testing.assert_array_equal(getattr(twice, name), np.repeat(getattr(part, name), 2, axis=0))
    for (level, z, _), (part_level, part_z, _) in zip(rows.terms, part.terms):
        np.testing.assert_array_equal(part_level, level[taken])
        np.testing.assert_array_equal(part_z, z[taken])
    np.testing.assert_array_equal(part.group, (rows.group[taken] == 2).astype(int))
    np.testing.assert_array_equal(twice.group, np.repeat(part.group, 2) * 2 + np.tile([0, 1], len(taken)))


def test_pirls_stops_at_a_solve_that_fails_without_halving_it_alone_and_in_a_batch(monkeypatch):
    # a point whose working system does not factor (NaN theta here; an overshooting trial in a search) gives a NaN
    # solution, which halving keeps: PIRLS stops after that step, not converged, and the other datasets are as alone
    import hierpool.algebra.laplace as laplace_module

    designs, rows, fam = _batch(*MODELS["crossed Bernoulli, logit"])
    theta, beta = _points(designs, rows, 5)
    bad = theta.copy()
    bad[1] = np.nan
    mode = conditional_modes(bad, beta, rows, fam)
    good = conditional_modes(theta, beta, rows, fam)
    assert mode.steps[1] == 1 and not mode.converged[1] and np.isnan(mode.penalized_deviance[1])
    for g in (0, 2):
        assert mode.converged[g] and mode.penalized_deviance[g] == good.penalized_deviance[g]
    deviances = []
    penalized = laplace_module.penalized_deviance
    monkeypatch.setattr(laplace_module, "penalized_deviance", lambda *a: (deviances.append(1), penalized(*a))[1])
    single = conditional_mode(bad[1], beta[1], designs[1], fam)
    assert single.steps == 1 and not single.converged and np.isnan(single.laplace)
    assert len(deviances) == 2  # at the start and at the step: no halving


@pytest.mark.parametrize("model", MODELS)
def test_a_batch_s_laplace_criterion_and_gradient_equal_each_dataset_s_own(model):
    designs, rows, fam = _batch(*MODELS[model])
    theta, beta = _points(designs, rows, 11)
    saturated = np.array([saturated_deviance(d, fam) for d in designs])
    value, gradient, mode = laplace_and_gradient(theta, beta, rows, fam, saturated)
    for g, design in enumerate(designs):
        single, single_gradient = laplace_and_gradient_on_host(theta[g], beta[g], design, fam)
        assert value[g] == pytest.approx(single.laplace, rel=1e-11), f"criterion of dataset {g}"
        np.testing.assert_allclose(gradient[g], single_gradient, rtol=1e-7, atol=1e-8, err_msg=f"gradient, {g}")
        for j, term in enumerate(design.terms):  # the dataset's own levels; its padded ones have no rows: 0
            np.testing.assert_allclose(mode.u[j][g, : term.n_levels], single.u[j], rtol=1e-7, atol=1e-9)
            assert not mode.u[j][g, term.n_levels :].any()
    # PIRLS from another start (the mode at a nearby point, as at a forward-difference shift) reaches the same mode
    again, again_gradient, _ = laplace_and_gradient(theta * (1 + 1e-6), beta, rows, fam, saturated, start_u=mode.u)
    cold, cold_gradient, _ = laplace_and_gradient(theta * (1 + 1e-6), beta, rows, fam, saturated)
    # (PIRLS stops on the penalized deviance's change, 1e-12 relative; Newton's steps, quadratic near the mode,
    # for every link: Fisher scoring's linear ones left the two starts a few 1e-10 apart with a non-canonical link)
    np.testing.assert_allclose(again, cold, rtol=1e-11)
    np.testing.assert_allclose(again_gradient, cold_gradient, rtol=1e-5, atol=1e-7)


def test_newton_on_host_s_lazy_shifts_take_the_eager_search_s_steps():
    # a batch of smooth convex criteria: the shifts evaluated only around accepted trials give the same Hessians,
    # and each accepted trial's state is what its shifts receive
    rng = np.random.default_rng(3)
    scales, targets = rng.uniform(0.5, 2.0, (6, 3)), rng.normal(size=(6, 3))
    accepted = np.zeros(6)

    def value_and_grad(points, rows):
        a, c = scales[rows][:, None, :], targets[rows][:, None, :]
        return np.sum(np.exp(a * (points - c)) - a * points, axis=-1), a * np.exp(a * (points - c)) - a

    def lazy(points, rows):  # the state: the trial point itself
        value, gradient = value_and_grad(points, rows)
        return value, gradient, [points.copy()]

    def shift_gradients(points, rows, state):
        accepted[rows] += 1
        shifts = points - state[0][:, None, :]  # each shift moves its own trial along one axis, forwards
        np.testing.assert_array_equal(shifts != 0, np.broadcast_to(np.eye(3, dtype=bool), shifts.shape))
        assert np.all(np.diagonal(shifts, axis1=-2, axis2=-1) > 0)
        return value_and_grad(points, rows)[1]

    start = np.full((6, 3), 2.0)
    eager = newton_on_host(value_and_grad, start, with_curvature=True)
    shifted = newton_on_host(lazy, start, with_curvature=True, shift_gradients=shift_gradients)
    for a, b in zip(eager, shifted):
        np.testing.assert_array_equal(a, b)
    assert np.all(accepted >= 3)
    np.testing.assert_allclose(eager[0], targets, atol=1e-6)  # the minimum: exp(a (x - c)) = 1


def _profiled_gradient(theta, beta, rows, fam):
    """d/dbeta of min_u P(u, beta) (envelope theorem: -2 X' s at the mode, s the rows' scores), per dataset."""
    mode = conditional_modes(theta, beta, rows, fam)
    _, weights, residual = fam.working(rows.y, mode.eta, rows.trials)
    return -2.0 * np.stack([np.bincount(rows.group, weights=weights * residual * x, minlength=rows.n_groups)
                            for x in rows.X.T], axis=1), mode


@pytest.mark.parametrize("model", MODELS)
def test_fixed_effects_curvature_is_the_hessian_in_beta_of_the_penalized_deviance_profiled_over_u(model):
    # central differences of the profiled gradient: the Schur complement with the observed information (a probit
    # link's Fisher weights would differ by the residuals' terms), and R_X R_X^T the inverse of solve's vcov_beta
    designs, rows, fam = _batch(*MODELS[model])
    theta, beta = _points(designs, rows, 5)
    _, mode = _profiled_gradient(theta, beta, rows, fam)
    curvature = fixed_effects_curvature(theta, beta, rows, fam, mode.u)
    h, p = 1e-5, beta.shape[1]
    columns = []
    for k in range(p):
        step = h * np.eye(p)[k]
        columns.append((_profiled_gradient(theta, beta + step, rows, fam)[0]
                        - _profiled_gradient(theta, beta - step, rows, fam)[0]) / (2 * h))
    np.testing.assert_allclose(curvature, np.stack(columns, axis=2), rtol=1e-6, atol=1e-6)
    system, counts = working_system(rows, np.ones(len(rows.group)), mode.working_weights, fixed=True)
    np.testing.assert_allclose(np.linalg.inv(fixed_effects_information(theta, system)),
                               solve(theta, system, n=counts).vcov_beta, rtol=1e-10)


def test_one_dataset_s_fixed_effect_information_is_the_batch_s_profiled_curvature_for_a_canonical_link():
    # hp.glmm's start Hessian (algebra.laplace: the joint system at the mode's Fisher weights, one dataset's sparse
    # build) against the batch's (laplace_batch: the observed information, batched_systems' build), which agree for
    # a canonical link; and it is twice the inverse of that mode's vcov_beta
    designs, rows, fam = _batch(*MODELS["crossed Bernoulli, logit"])
    theta, beta = _points(designs, rows, 7)
    batch = fixed_effects_curvature(theta, beta, rows, fam, conditional_modes(theta, beta, rows, fam).u)
    for g, design in enumerate(designs):
        mode = conditional_mode(theta[g], beta[g], design, fam)
        information = fixed_effect_information(theta[g], mode, design, fam)
        np.testing.assert_allclose(information, batch[g], rtol=1e-8)
        np.testing.assert_allclose(information, 2 * np.linalg.inv(mode_solution(theta[g], mode, design, fam).vcov_beta),
                                   rtol=1e-10)


def _coupled(points, rows, scales, targets):
    """A smooth convex criterion per dataset whose last coordinate is coupled to the first: (values, gradients)."""
    a, c = scales[rows][:, None, :], targets[rows][:, None, :]
    coupling = points[..., 0] - points[..., -1]
    value = np.sum(np.exp(a * (points - c)) - a * points, axis=-1) + coupling**2
    gradient = a * np.exp(a * (points - c)) - a
    gradient[..., 0] += 2 * coupling
    gradient[..., -1] -= 2 * coupling
    return value, gradient


def _trailing_search(error, scales, targets, shifted, current=None, **options):
    """newton_on_host on :func:`_coupled`, its trailing block ``error`` times the true one; ``shifted`` collects each
    shift call's (width, datasets), ``current`` (B, 3) each dataset's state as the shift calls last passed it (as
    fit_glmm keeps each dataset's mode at its current point)."""

    def lazy(points, rows):
        value, gradient = _coupled(points, rows, scales, targets)
        return value, gradient, [points.copy()]

    def shift_gradients(points, rows, state):
        # each shift moves its own point (the state kept for it) along one coordinate: the search's leading ones,
        # the trailing one where it stops, or all of them
        width = points.shape[1]
        moved = points - state[0][:, None, :]
        expected = np.zeros((width, 3), bool)
        expected[np.arange(width), {2: [0, 1], 1: [2], 3: [0, 1, 2]}[width]] = True
        np.testing.assert_array_equal(moved != 0, np.broadcast_to(expected, moved.shape))
        shifted.append((width, tuple(rows)))
        if current is not None:
            current[rows] = state[0]
        return _coupled(points, rows, scales, targets)[1]

    def trailing(points, rows, state):
        np.testing.assert_array_equal(points, state[0])
        a, c = scales[rows][:, -1], targets[rows][:, -1]
        block = (a**2 * np.exp(a * (points[:, -1] - c)) + 2.0)[:, None, None]
        if error == "nan":  # dataset 1's approximation fails
            return np.where((rows == 1)[:, None, None], np.nan, block)
        return error * block

    return newton_on_host(lazy, np.full((len(scales), 3), 1.5), with_curvature=True, shift_gradients=shift_gradients,
                          trailing_curvature=None if error is None else trailing, **options)


@pytest.mark.parametrize("error", [1.05, 0.5, "nan"])
def test_newton_on_host_s_trailing_block_reaches_the_optimum_and_returns_the_full_hessian(monkeypatch, error):
    # the search shifts only the leading coordinates and takes the trailing block from an approximation; where it
    # stops, the last column is differenced and confirms the stop.  It reaches the plain search's optimum, and what
    # it returns is the full forward-difference Hessian there.  A block half the true one doubles the steps (they
    # overshoot): there the search falls back on differencing every coordinate, without which it fails under the
    # tenfold fall of the damping after a rejection (the threefold fall alone converges there)
    rng = np.random.default_rng(4)
    scales, targets = rng.uniform(0.5, 2.0, (5, 3)), rng.normal(size=(5, 3))
    shifted = []
    plain = _trailing_search(None, scales, targets, shifted)
    plain_shifts = sum(w * len(rows) for w, rows in shifted)
    shifted.clear()
    current = np.full((5, 3), np.nan)
    approximate = _trailing_search(error, scales, targets, shifted, current)
    widths = {w for w, _ in shifted}
    if error == "nan":  # dataset 1 differenced from its first accepted point on
        assert all(1 not in rows for w, rows in shifted if w != 3)
    elif error > 1:  # stops confirmed (one shift), fewer shifts in all
        assert {1, 2} <= widths and sum(w * len(rows) for w, rows in shifted) < plain_shifts
    else:
        assert 3 in widths
        monkeypatch.setattr(optimize_module, "MODEL_AGREEMENT", np.inf)
        monkeypatch.setattr(optimize_module, "APPROXIMATE_PASSES", 10**9)
        # (with the damping's tenfold fall after a rejection too: the gentler fall alone damps the doubled steps)
        monkeypatch.setattr(optimize_module, "DAMPING_FALL_AFTER_REJECTION", optimize_module.DAMPING_FALL)
        assert not _trailing_search(error, scales, targets, [])[4].all()
    assert approximate[4].all()
    # the shift calls carry every accepted point's state, the last one each dataset's optimum
    np.testing.assert_array_equal(current, approximate[0])
    np.testing.assert_allclose(approximate[0], plain[0], atol=1e-7)
    every, steps = _probe_points(approximate[0], np.sqrt(np.finfo(float).eps), np)  # the default width
    values, gradients = _coupled(every, np.arange(5), scales, targets)
    np.testing.assert_allclose(approximate[5], _finite_difference_hessians(gradients, steps, np), rtol=1e-12)


def test_newton_on_host_s_secant_updates_keep_the_caller_s_state_at_every_accepted_point(monkeypatch):
    # with secant updates the shifts are evaluated at the first point and where the update is distrusted; at the
    # other accepted points shift_gradients is called with no shifts, so that the caller keeps each dataset's state
    # at its current point (fit_glmm's modes, from which its next trials start PIRLS)
    rng = np.random.default_rng(4)
    scales, targets = rng.uniform(0.5, 2.0, (5, 3)), rng.normal(size=(5, 3))
    current, widths = np.full((5, 3), np.nan), []

    def lazy(points, rows):
        value, gradient = _coupled(points, rows, scales, targets)
        return value, gradient, [points.copy()]

    def shift_gradients(points, rows, state):
        current[rows] = state[0]
        widths.append(points.shape[1])
        return _coupled(points, rows, scales, targets)[1] if points.shape[1] else np.zeros(points.shape)

    secant = newton_on_host(lazy, np.full((5, 3), 1.5), with_curvature=True, shift_gradients=shift_gradients,
                            secant=True)
    plain = _trailing_search(None, scales, targets, [])
    assert secant[4].all() and 0 in widths and 3 in widths
    np.testing.assert_array_equal(current, secant[0])
    np.testing.assert_allclose(secant[0], plain[0], atol=1e-7)
    # after APPROXIMATE_PASSES updates a dataset's search differences every accepted point
    monkeypatch.setattr(optimize_module, "APPROXIMATE_PASSES", 1)
    updated = []

    def counting(points, rows, state):  # the datasets whose accepted point's curvature is an update
        updated.extend([] if points.shape[1] else rows)
        return shift_gradients(points, rows, state)

    again = newton_on_host(lazy, np.full((5, 3), 1.5), shift_gradients=counting, secant=True)
    assert again[4].all() and updated and np.bincount(updated).max() == 1


def test_pirls_from_far_off_halves_as_the_single_path_does_and_a_dataset_at_theta_zero_has_no_effects():
    designs, rows, fam = _batch(*MODELS["crossed Bernoulli, logit"])
    theta = np.array([[4.0, 4.0], [0.0, 0.0], [1.0, 0.5]])
    beta = np.zeros((3, designs[0].p))
    start = [np.full((3, width, 1), 3.0) for _, _, width in rows.terms]
    saturated = np.array([saturated_deviance(d, fam) for d in designs])
    value, gradient, mode = laplace_and_gradient(theta, beta, rows, fam, saturated, start_u=start)
    assert mode.steps[0] > 3 and mode.converged.all()
    for g, design in enumerate(designs):
        own = [x[g, : t.n_levels] for x, t in zip(start, design.terms)]
        single, single_gradient = laplace_and_gradient_on_host(theta[g], beta[g], design, fam, start_u=own)
        assert mode.steps[g] == single.steps, f"PIRLS steps of dataset {g}"
        assert value[g] == pytest.approx(single.laplace, rel=1e-11)
        np.testing.assert_allclose(gradient[g], single_gradient, rtol=1e-7, atol=1e-8)
        for j, term in enumerate(design.terms):
            np.testing.assert_allclose(mode.u[j][g, : term.n_levels], single.u[j], rtol=1e-7, atol=1e-9)
    assert not any(x[1].any() for x in mode.b)  # theta = 0: no random effects, whatever PIRLS's u


@pytest.mark.parametrize("formula, family_name, link, frames", [
    ("y ~ x + (1 | s) + (1 | i)", "binomial", "logit", [_crossed(8, 6), _crossed(9, 5), _crossed(10, 6)]),
    ("y ~ t + offset(log(e)) + (1 + t | g)", "poisson", "log", [_slopes(11, 8), _slopes(12, 7)]),
    # a non-canonical link: when PIRLS was Fisher scoring there (linear convergence), a search whose trials started
    # PIRLS from the last accepted mode stalled short of the optimum on 44 of 300 such datasets
    ("cbind(k, n - k) ~ x + (1 | g) + (1 | g:h)", "binomial", "probit", [_nested_probit(s) for s in range(13, 21)]),
], ids=["crossed Bernoulli", "correlated slopes", "nested probit"])
def test_fit_batch_s_glmm_host_path_equals_its_compiled_path(monkeypatch, formula, family_name, link, frames):
    # one host call for all the datasets, whatever the machine's cores: datasets leave the search on different
    # passes, so a call's rows, saturated constants and starts are taken for the ones still searching
    monkeypatch.setattr(fit_glmm_module, "thread_count", lambda *_: 1)
    host, compiled = host_and_compiled(monkeypatch, fit_glmm_module, formula, frames, by="rep", family=family_name,
                                       link=link, progress=False, host_function="fit_chunk_on_host")
    # the host's search takes the Hessian's beta block from the profiled curvature (fixed_effects_curvature) and
    # differences it where it stops; the compiled one differences it at every pass.  Both stop where their last
    # model's optimum is within 1e-5 standard errors (sqrt(fit_glmm.DECREASE_TOL)): the criteria agree to rounding,
    # the estimates to 3e-5 of their standard errors (8e-6 at most, measured)
    for batch in (host, compiled):
        assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(host.objective, compiled.objective, rtol=1e-11)
    assert np.all(np.abs(host.beta - compiled.beta) <= 3e-5 * compiled.beta_se)
    np.testing.assert_allclose(host.beta_se, compiled.beta_se, rtol=1e-4)
    np.testing.assert_allclose(host.theta, compiled.theta, rtol=1e-5, atol=1e-6)
    # the modes likewise, in their conditional sds; those sds follow theta (to 1e-6 absolute near a boundary:
    # 1.9e-7 measured)
    assert np.all(np.abs(host.ranef.condval - compiled.ranef.condval) <= 3e-5 * compiled.ranef.condsd + 1e-12)
    np.testing.assert_allclose(host.ranef.condsd, compiled.ranef.condsd, rtol=1e-5, atol=1e-6)
    assert (host.is_singular == compiled.is_singular).all()


def test_beta_s_covariance_is_the_beta_block_of_the_inverse_of_half_the_hessian_or_nan():
    rng = np.random.default_rng(5)
    root = rng.normal(size=(4, 5, 5))
    hessian = root @ np.swapaxes(root, -1, -2) + 0.5 * np.eye(5)  # positive definite: (theta 2, beta 3)
    expected = np.linalg.inv(0.5 * hessian)[:, 2:, 2:]
    np.testing.assert_allclose(beta_covariance(hessian, np.zeros(4), 2, 3), expected, rtol=1e-12)
    # a negative binomial's log shape (last) is held: its row and column do not enter
    bordered = np.zeros((4, 6, 6))
    bordered[:, :5, :5], bordered[:, 5, 5] = hessian, 1.0
    bordered[:, 5, :5] = bordered[:, :5, 5] = 0.3
    np.testing.assert_allclose(beta_covariance(bordered, np.zeros(4), 2, 3), expected, rtol=1e-12)
    # no finite criterion, or a beta block of the inverse that is not positive definite: no number
    indefinite = hessian.copy()
    indefinite[1] = np.diag([1.0, 1.0, -1.0, 1.0, 1.0])
    out = beta_covariance(indefinite, np.array([0.0, 0.0, np.inf, 0.0]), 2, 3)
    assert np.isnan(out[1]).all() and np.isnan(out[2]).all()
    np.testing.assert_allclose(out[[0, 3]], expected[[0, 3]], rtol=1e-12)
    # the same rule in a compiled program (one dataset, traced)
    import jax
    traced = jax.jit(lambda h, v: beta_covariance(h, v, 2, 3))
    np.testing.assert_allclose(traced(hessian[0], 0.0), expected[0], rtol=1e-10)
    assert np.isnan(np.asarray(traced(indefinite[1], 0.0))).all()
