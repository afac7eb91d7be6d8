"""hp.fit_batch with several random-effect terms (crossed, nested, slopes): each dataset equals hp.lmm on it."""

import dataclasses
import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_fits, assert_terms_kept_apart_agree, host_and_compiled, uncorrelated_slope_frames

import hierpool as hp
from hierpool.errors import ArgumentError

CROSSED = "diameter ~ 1 + (1 | plate) + (1 | sample)"
NESTED = "y ~ x + (1 + x | school) + (1 | school:class)"


@pytest.fixture(scope="module")
def crossed():
    """Eight Penicillin-shaped replicates; one lacks a plate, one a sample, one has a single sample (unfittable)."""
    pen = hp.datasets.penicillin()
    sims = hp.simulate(hp.lmm(CROSSED, pen), 8, seed=3).to_numpy()
    frames = []
    for j in range(8):
        frame = pen.assign(diameter=sims[:, j])
        if j == 2:
            frame = frame[frame["plate"] != "c"]
        if j == 5:
            frame = frame[frame["sample"] != "F"]
        if j == 6:
            frame = frame[frame["sample"] == "A"]
        frames.append(frame)
    return frames, hp.fit_batch(CROSSED, frames, by="rep", progress=False)


@pytest.fixture(scope="module")
def nested():
    """Schools with classes, correlated slopes per school, prior weights and an offset; datasets differ in size."""
    rng = np.random.default_rng(11)
    frames = []
    for d in range(6):
        n_schools = 5 + d % 3
        rows = []
        for s in range(n_schools):
            slope = rng.normal(0, 0.5)
            intercept = rng.normal(0, 1.0)
            for c in range(2 + (s + d) % 2):
                class_effect = rng.normal(0, 0.7)
                for _ in range(4 + (c % 2)):
                    x = rng.normal()
                    rows.append(dict(school=f"s{s}", cls=f"c{c}", x=x, w=rng.uniform(0.5, 2.0),
                                     o=0.1 * rng.normal(),
                                     y=1.0 + 0.5 * x + intercept + slope * x + class_effect + rng.normal()))
        frame = pd.DataFrame(rows).rename(columns={"cls": "class"})
        frames.append(frame)
    formula = NESTED.replace("y ~ x", "y ~ x + offset(o)")
    return frames, formula, hp.fit_batch(formula, frames, by="rep", weights="w", progress=False)


def _single(formula, frame, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hp.lmm(formula, frame, **kwargs)


def _check_against_single(batch, d, fit):
    assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-8), f"criterion of dataset {d}"
    np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6, atol=1e-8,
                               err_msg=f"fixed effects of dataset {d}")
    np.testing.assert_allclose(batch.beta_se[d], np.sqrt(np.diag(fit.vcov.to_numpy())), rtol=1e-5,
                               err_msg=f"fixed-effect ses of dataset {d}")
    assert batch.sigma[d] == pytest.approx(fit.sigma, rel=1e-6), f"sigma of dataset {d}"
    # per term, matched by name (hp.lmm orders a dataset's terms by its own level counts)
    covariances = dict(zip([t.group for t in fit.design.terms], fit.term_covariances()))
    ranef = fit.ranef
    for term in batch.terms:
        scale = max(np.abs(covariances[term.group]).max(), fit.sigma**2)
        np.testing.assert_allclose(term.covariance[d], covariances[term.group], rtol=1e-5, atol=1e-6 * scale,
                                   err_msg=f"covariance of {term.group} in dataset {d}")
        rows = ranef[ranef["grpvar"] == term.group]
        for c, coef in enumerate(term.coef_names):
            expected = rows[rows["term"] == coef].set_index("grp")
            assert list(expected.index.astype(str)) == list(np.asarray(term.levels[d]).astype(str)), \
                f"levels of {term.group} in dataset {d}"
            np.testing.assert_allclose(term.b[d][:, c], expected["condval"].to_numpy(), rtol=1e-5,
                                       atol=1e-6 * np.sqrt(scale), err_msg=f"BLUPs of {term.group} in dataset {d}")
            np.testing.assert_allclose(term.cond_sd[d][:, c], expected["condsd"].to_numpy(), rtol=1e-5,
                                       atol=1e-7 * np.sqrt(scale), err_msg=f"cond. sds of {term.group}, dataset {d}")


def test_crossed_datasets_equal_their_single_fits(crossed):
    frames, batch = crossed
    assert [t.group for t in batch.terms] == ["plate", "sample"]
    assert not batch.refit.any(), batch.messages[batch.refit].tolist()
    for d, frame in enumerate(frames):
        if d == 6:
            continue
        fit = _single(CROSSED, frame)
        _check_against_single(batch, d, fit)
        np.testing.assert_allclose(batch.theta[d], fit.theta, rtol=1e-5, err_msg=f"theta of dataset {d}")
    # levels differ between datasets (a missing plate, a missing sample): their own, in hp.lmm's order
    assert [len(levels) for levels in batch.terms[0].levels] == [24, 24, 23, 24, 24, 24, 24, 24]
    assert [len(levels) for levels in batch.terms[1].levels] == [6, 6, 6, 6, 6, 5, 1, 6]


def test_a_dataset_that_cannot_be_fitted_keeps_its_reason(crossed):
    frames, batch = crossed
    assert np.isnan(batch.objective.iloc[6]) and not batch.converged.iloc[6]
    # plate, with one sample: the single fit's words (the batch had its own, "24 random effects for 24 observations")
    with pytest.raises(hp.DataError) as refused:
        hp.lmm(CROSSED, frames[6])
    assert batch.messages.iloc[6] == str(refused.value)
    assert batch.converged.drop(batch.datasets[6]).all()


def test_nested_slopes_with_weights_and_offset_equal_their_single_fits(nested):
    frames, formula, batch = nested
    assert {t.group for t in batch.terms} == {"school", "school:class"}
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    for d, frame in enumerate(frames):
        _check_against_single(batch, d, _single(formula, frame, weights="w"))


def test_secant_searches_with_weights_and_offset_equal_their_single_fits(nested, monkeypatch):
    # from terms_search.SECANT_MIN_WORK of dense work a point the search updates its curvature by secants
    # (newton_on_host's secant); forced here on the small nested datasets, which evaluate fewer points so and reach
    # the single fits' criteria, as the forward-difference search does
    from hierpool.algebra.search import terms as terms_search

    frames, formula, _ = nested
    points = []
    evaluate = terms_search.host_objective_and_gradient

    def counting(*args, **kwargs):
        inner = evaluate(*args, **kwargs)

        def counted(theta):
            points.append(theta.shape[0] * theta.shape[1])
            return inner(theta)
        return counted

    monkeypatch.setattr(terms_search, "host_objective_and_gradient", counting)
    monkeypatch.setenv("HIERPOOL_HOST_PROCESSES", "0")
    differenced = hp.fit_batch(formula, frames, by="rep", weights="w", progress=False)
    differenced_points, points[:] = sum(points), []
    monkeypatch.setattr(terms_search, "SECANT_MIN_WORK", 0)
    batch = hp.fit_batch(formula, frames, by="rep", weights="w", progress=False)
    assert sum(points) < 0.7 * differenced_points
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    np.testing.assert_allclose(batch.objective, differenced.objective, rtol=1e-10)
    for d, frame in enumerate(frames):
        _check_against_single(batch, d, _single(formula, frame, weights="w"))


def test_a_secant_search_is_looked_at_for_a_restart_after_its_own_passes(nested, monkeypatch):
    # a secant search takes more passes to converge than one that differences each trial: a search with a vector
    # term is looked at for a restart after SECANT_RESTART_PASSES, not RESTART_PASSES (with 20, one three-term
    # dataset was restarted a pass before it converged, then refitted)
    from hierpool.algebra.search import terms as terms_search

    frames, formula, _ = nested
    calls = []
    optimize = terms_search.optimize_on_host

    def recording(value_and_grad, start, passes, ks, **options):  # each search's passes and whether it is secant
        calls.append((passes, options["secant"]))
        return optimize(value_and_grad, start, passes, ks, **options)

    monkeypatch.setattr(terms_search, "optimize_on_host", recording)
    monkeypatch.setenv("HIERPOOL_HOST_PROCESSES", "0")
    for threshold, expected in ((0, (terms_search.SECANT_RESTART_PASSES, True)),
                                (10**15, (terms_search.RESTART_PASSES, False))):
        monkeypatch.setattr(terms_search, "SECANT_MIN_WORK", threshold)
        calls.clear()
        hp.fit_batch(formula, frames[:2], by="rep", weights="w", progress=False)
        assert calls and calls[0] == expected


def test_ml_criterion_equals_the_single_fit(nested):
    frames, formula, _ = nested
    batch = hp.fit_batch(formula, frames[:2], by="rep", weights="w", reml=False, progress=False)
    assert not batch.refit.any(), batch.messages.tolist()  # the batch's numbers, not hp.lmm's refits
    for d in range(2):
        fit = _single(formula, frames[d], weights="w", reml=False)
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-8), f"ML criterion of dataset {d}"


def test_tables_name_every_term(crossed):
    frames, batch = crossed
    table = batch.to_frame()
    for column in ("sd_plate_Intercept", "sd_sample_Intercept", "sigma", "Intercept"):
        assert column in table.columns, column
    fit = _single(CROSSED, frames[0])
    expected = fit.varcorr.set_index(["grp", "var1"])["sdcor"]
    mine = batch.varcorr[batch.varcorr[batch.datasets.name] == batch.datasets[0]].set_index(["grp", "var1"])["sdcor"]
    np.testing.assert_allclose(mine.loc[expected.index].to_numpy(), expected.to_numpy(), rtol=1e-5)
    assert table["sd_sample_Intercept"].iloc[0] == pytest.approx(expected.loc[("sample", "Intercept")], rel=1e-5)
    ranef = batch.ranef
    assert set(ranef["grpvar"]) == {"plate", "sample"}
    assert len(ranef) == sum(len(levels) for t in batch.terms for levels in t.levels)
    with pytest.raises(ArgumentError, match="2 random-effect terms"):
        batch.covariance


def test_bootstrap_of_a_crossed_model_refits_every_replicate():
    pen = hp.datasets.penicillin()
    fit = _single(CROSSED, pen)
    boot = hp.bootstrap(fit, 6, seed=2, progress=False)
    assert not boot.batch.refit.any(), boot.batch.messages.tolist()
    assert list(boot.estimate.index) == ["Intercept", "sd_plate_Intercept", "sd_sample_Intercept", "sigma"]
    assert boot.failed == 0
    sims = hp.simulate(fit, 6, seed=2).to_numpy()
    for j in (0, 5):  # each replicate is hp.lmm's fit of that simulated response
        single = _single(CROSSED, pen.assign(diameter=sims[:, j]))
        assert boot.batch.objective.iloc[j] == pytest.approx(single.objective, rel=1e-8)


@pytest.mark.parametrize("formula", ["y ~ x + (1 + x | g) + (1 | h)", "y ~ x + (1 | g) + (1 + x | h)"])
def test_a_padded_batched_system_has_the_criterion_and_solution_of_the_dataset_s_own_system(formula):
    """The batch's systems (full coupling grid, padded levels, n as data) against build_system, away from the optimum
    (on the host: the compiled path is checked against hp.lmm above)."""
    from hierpool.algebra.batched_systems import batched_systems
    from hierpool.algebra.criterion import objective
    from hierpool.algebra.henderson import prediction_covariance, solve
    from hierpool.algebra.system import build_system
    from hierpool.spec.design import build_design

    rng = np.random.default_rng(5)
    frame = pd.DataFrame({"g": rng.integers(0, 7, 60).astype(str), "h": rng.integers(0, 4, 60).astype(str),
                          "x": rng.normal(size=60), "w": rng.uniform(0.5, 2, 60)})
    frame["y"] = 3 + frame["x"] + rng.normal(size=60)
    design = build_design(formula, frame, weights="w")  # term 0: g, a slope term first or in the rest
    system = build_system(design, host=True)
    terms = [(t.index, t.z, width) for t, width in zip(design.terms, (9, 6))]  # both terms padded
    batch, n = batched_systems(np.zeros(design.n, int), 1, terms, design.X, design.y, design.weights,
                               design.offset)
    one = jax_tree_first(batch)
    for theta in (np.array([0.8, 0.3, 0.5, 1.2]), np.array([0.1, -0.4, 2.0, 0.0])):
        expected = float(objective(theta, system))
        assert float(objective(theta, one, n=n[0])) == pytest.approx(expected, rel=1e-12)
        mine, single = solve(theta, one, n=n[0]), solve(theta, system)
        np.testing.assert_allclose(mine.beta, single.beta, rtol=1e-10)
        np.testing.assert_allclose(mine.b[0][:7], single.b[0], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(mine.b[0][7:], 0.0, atol=0)  # padded levels: no effect
        np.testing.assert_allclose(mine.cond_var[1][:4], single.cond_var[1], rtol=1e-9)
        # the blocks of the inverse through the batch's dense couplings (henderson._grid_couplings): term 0's, and
        # term 0's levels with the rest's own columns (the padded term's first 4 levels, then X)
        mine, single = prediction_covariance(theta, one), prediction_covariance(theta, system)
        np.testing.assert_allclose(mine.term0[:7], single.term0, rtol=1e-9)
        k1 = design.terms[1].k
        own = np.r_[np.arange(4 * k1), 6 * k1 + np.arange(design.p)]
        np.testing.assert_allclose(mine.cross[:7][..., own], single.cross, rtol=1e-8, atol=1e-12)
    # a GLMM's working system (weights not prior weights): the same blocks, no log of the weights
    working, _ = batched_systems(np.zeros(design.n, int), 1, terms, design.X, design.y, design.weights,
                                 design.offset, prior_weights=False)
    assert float(np.asarray(batch.log_weights)[0]) == pytest.approx(np.sum(np.log(design.weights)))
    np.testing.assert_array_equal(working.log_weights, [0.0])
    for name in ("a00", "rest", "beta_shift"):
        np.testing.assert_array_equal(getattr(working, name), getattr(batch, name))
    for mine, theirs in zip(working.couplings, batch.couplings):
        np.testing.assert_array_equal(mine.values, theirs.values)


def jax_tree_first(tree):
    from hierpool.algebra.system import map_arrays

    return map_arrays(lambda a: np.asarray(a)[0], tree)


def test_a_refit_maps_the_single_fit_s_terms_to_the_batch_s_order():
    """Datasets the batched optimizer stops on (one Newton iteration) are refitted by hp.lmm; a dataset whose own
    level counts order its terms otherwise (more samples than plates) lands in the batch's term order."""
    pen = hp.datasets.penicillin()
    few_plates = pen[pen["plate"].isin(list("abcd"))]  # 4 plates, 6 samples: hp.lmm puts sample first
    batch = hp.fit_batch(CROSSED, [pen, few_plates], by="rep", max_iterations=1, progress=False)
    assert batch.refit.all() and batch.converged.all(), batch.messages.tolist()
    assert "refitted by hp.lmm" in batch.messages.iloc[1]
    fit = _single(CROSSED, few_plates)
    assert [t.group for t in fit.design.terms] == ["sample", "plate"]
    assert [t.group for t in batch.terms] == ["plate", "sample"]
    np.testing.assert_allclose(batch.theta[1], fit.theta[::-1], rtol=1e-12)
    _check_against_single(batch, 1, fit)


def test_float32_keeps_a_large_location_and_agrees_with_float64(crossed):
    frames, batch = crossed
    shifted = [frame.assign(diameter=frame["diameter"] + 1e4) for frame in frames[:2]]
    single = hp.fit_batch(CROSSED, shifted, by="rep", dtype="float32", progress=False)
    np.testing.assert_allclose(single.beta[:, 0], batch.beta[:2, 0] + 1e4, rtol=1e-6)
    np.testing.assert_allclose(single.objective.to_numpy(), batch.objective.to_numpy()[:2], rtol=1e-4)


def test_known_residual_sds_with_several_terms_equal_the_single_fits(crossed):
    frames, _ = crossed
    rng = np.random.default_rng(2)
    known = [frame.assign(sd=rng.uniform(0.3, 0.8, len(frame))) for frame in frames[:2]]
    batch = hp.fit_batch(CROSSED, known, by="rep", se="sd", progress=False)
    assert batch.sigma_known and not batch.refit.any(), batch.messages.tolist()
    for d, frame in enumerate(known):
        fit = _single(CROSSED, frame, se="sd")
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-8), f"criterion of dataset {d}"
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6)
    assert "Residual" not in set(batch.varcorr["grp"])


def _host_and_compiled(monkeypatch, *args, **kwargs):
    """conftest.host_and_compiled on the several-term path."""
    from hierpool.batch import fit_terms

    return host_and_compiled(monkeypatch, fit_terms, *args, progress=False, host_function="fit_on_host", **kwargs)


@pytest.mark.parametrize("case", ["crossed", "weights_offset_ml", "known_sds"])
def test_the_host_path_equals_the_compiled_programs(case, crossed, nested, monkeypatch):
    if case == "crossed":  # datasets of different level counts (padded levels); one not fitted (by either path)
        host, compiled = _host_and_compiled(monkeypatch, CROSSED, crossed[0], by="rep")
    elif case == "weights_offset_ml":  # correlated slopes in term 0
        frames, formula, _ = nested
        host, compiled = _host_and_compiled(monkeypatch, formula, frames[:3], by="rep", weights="w", reml=False)
    else:
        rng = np.random.default_rng(4)
        known = [frame.assign(sd=rng.uniform(0.3, 0.8, len(frame))) for frame in crossed[0][:3]]
        host, compiled = _host_and_compiled(monkeypatch, CROSSED, known, by="rep", se="sd")
    # the compiled search has neither saddle-free steps nor interpolated damping: from the indefinite curvature of
    # the crossed and nested datasets' first passes the two take different steps, the compiled one then rejecting
    # runs of passes (tenfold growth) that the host does not, so the two stop at different points within the rules
    assert_same_fits(host, compiled, same_steps=case == "known_sds")


def test_a_compiled_search_that_stopped_short_is_searched_again_on_the_host(crossed, monkeypatch):
    """The compiled path (forced) hands a dataset its Newton's method left unconverged (dataset 2, made so here) to
    the host search from its start: the row is the batch's own fit, equal to hp.lmm's, not refitted; where the host
    search stops short too, hp.lmm refits it."""
    from concurrent.futures import Future

    from hierpool.batch import fit_terms

    frames = crossed[0][:3]
    rows = len(frames[2])  # (plate c dropped: the only dataset of its size)
    compiled = fit_terms._programs

    def programs(systems, n, *args, **kwargs):
        optimize, solve = compiled(systems, n, *args, **kwargs)

        def optimize_failing(systems, n, start):
            out = optimize.result()(systems, n, start)
            return {**out, "converged": out["converged"] & (n != rows)}

        failing = Future()
        failing.set_result(optimize_failing)
        return failing, solve

    monkeypatch.setattr(fit_terms, "_on_host", lambda *a: False)
    monkeypatch.setattr(fit_terms, "_programs", programs)
    searched, host_search = [], fit_terms.search_on_host
    monkeypatch.setattr(fit_terms, "search_on_host", lambda systems, n, *a, **k: searched.append(n.tolist())
                        or host_search(systems, n, *a, **k))
    again = hp.fit_batch(CROSSED, frames, by="rep", progress=False)
    assert searched == [[float(rows)]] and not again.refit.any() and again.converged.all(), again.messages.tolist()
    fit = _single(CROSSED, frames[2])
    assert again.objective.iloc[2] == pytest.approx(fit.objective, rel=1e-8)
    monkeypatch.setattr(fit_terms, "search_on_host",
                        lambda *a, **k: {**host_search(*a, **k), "converged": np.array([False])})
    refitted = hp.fit_batch(CROSSED, frames, by="rep", progress=False)
    assert refitted.refit.tolist() == [False, False, True]
    assert refitted.objective.iloc[2] == pytest.approx(fit.objective, rel=1e-12)


@pytest.mark.parametrize("formula, n0", [("y ~ x + (1 + x | g) + (1 | h)", 3), ("y ~ x + (1 | g) + (1 + x | h)", 1)])
def test_a_stack_of_systems_on_the_host_evaluates_as_each_system_alone(monkeypatch, formula, n0):
    """The host algebra over leading axes (datasets, points: hp.fit_batch's host path) against each dataset's
    compiled criterion, its reverse-mode gradient and its solution, away from the optimum; points that share term
    0's theta (probes in another term's) share its values and the Schur update, computed once."""
    import jax

    from hierpool.algebra import criterion
    from hierpool.algebra.batched_systems import batched_systems, shared_grid
    from hierpool.algebra.criterion import host_objective_and_gradient, objective
    from hierpool.algebra.henderson import solve
    from hierpool.spec.design import build_design

    rng = np.random.default_rng(8)
    frame = pd.DataFrame({"g": rng.integers(0, 6, 90).astype(str), "h": rng.integers(0, 4, 90).astype(str),
                          "x": rng.normal(size=90), "w": rng.uniform(0.5, 2, 90), "d": np.repeat([0, 1, 2], 30)})
    frame["y"] = 3 + frame["x"] + rng.normal(size=90)
    design = build_design(formula, frame, weights="w")  # term 0: g (n0 parameters)
    terms = [(t.index, t.z, width) for t, width in zip(design.terms, (7, 5))]  # padded
    systems, n = batched_systems(frame["d"].to_numpy(), 3, terms, design.X, design.y, design.weights, design.offset)
    thetas = rng.uniform(-0.5, 1.5, size=(3, 5, 4))  # five points per dataset, the third and fourth sharing term
    thetas[:, 2, :n0], thetas[:, 3, :n0] = thetas[:, 1, :n0], thetas[:, 0, :n0]  # 0's theta with the second and first
    term0_points = []
    term0_values = criterion._term0_values
    monkeypatch.setattr(criterion, "_term0_values", lambda t0, a00: (term0_points.append(t0.shape[:-2]),
                                                                      term0_values(t0, a00))[1])
    for reml in (True, False):
        values, gradients = host_objective_and_gradient(shared_grid(systems, np.arange(3), points=True), reml,
                                                        n=n[:, None])(thetas)
        for d in range(3):
            one = jax_tree_first(jax.tree_util.tree_map(lambda a: np.asarray(a)[d:d + 1], systems))
            for j in range(5):
                value, gradient = jax.value_and_grad(objective)(thetas[d, j], one, reml, n[d])
                assert values[d, j] == pytest.approx(float(value), rel=1e-12)
                np.testing.assert_allclose(gradients[d, j], gradient, rtol=1e-8, atol=1e-9)
    # three distinct points of five in each of the host's two evaluations (the compiled criterion's calls: no points)
    assert [shape for shape in term0_points if len(shape) == 2] == [(3, 3), (3, 3)]
    solved = solve(thetas[:, 0], shared_grid(systems, np.arange(3)), n=n)
    for d in range(3):
        one = jax_tree_first(jax.tree_util.tree_map(lambda a: np.asarray(a)[d:d + 1], systems))
        single = solve(thetas[d, 0], one, n=n[d])
        for name in ("beta", "vcov_beta", "sigma", "logdet_lz", "logdet_rx"):
            np.testing.assert_allclose(np.asarray(getattr(solved, name))[d], getattr(single, name), rtol=1e-10)
        for t in range(2):
            np.testing.assert_allclose(solved.b[t][d], single.b[t], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(solved.cond_var[t][d], single.cond_var[t], rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("formula", ["y ~ x + (1 + x | g) + (1 | h)", "y ~ x + (1 | g) + (1 + x | h)"])
def test_the_criterions_derivative_along_a_change_of_its_systems_is_the_complex_steps(formula):
    """The host adjoint's derivative along a change of the systems' sums (A00, the dense couplings, the rest:
    criterion._derivative_along, an AR(1) batch's derivative in u) equals the complex step of the criterion of the
    systems moved along it, at several points a dataset, REML and ML, term 0 of two coefficients and of one."""
    from hierpool.algebra.batched_systems import batched_systems, map_arrays, shared_grid, system_arrays
    from hierpool.algebra.criterion import host_objective_and_gradient, objective
    from hierpool.spec.design import build_design

    rng = np.random.default_rng(9)
    frame = pd.DataFrame({"g": rng.integers(0, 6, 90).astype(str), "h": rng.integers(0, 4, 90).astype(str),
                          "x": rng.normal(size=90), "d": np.repeat([0, 1, 2], 30)})
    frame["y"] = 3 + frame["x"] + rng.normal(size=90)
    design = build_design(formula, frame)

    def systems_of(z_noise, x_noise, y_noise):  # sums of rows of the design's levels: the systems' own shapes
        terms = [(t.index, t.z + z_noise * rng.normal(size=t.z.shape), width) for t, width in zip(design.terms, (7, 5))]
        X, y = design.X + x_noise * rng.normal(size=design.X.shape), design.y + y_noise * rng.normal(size=90)
        return batched_systems(frame["d"].to_numpy(), 3, terms, X, y, None, None)

    systems, n = systems_of(0.0, 0.0, 0.0)
    change, _ = systems_of(1.0, 1.0, 1.0)
    points = shared_grid(systems, np.arange(3), points=True)
    along = shared_grid(change, np.arange(3), points=True)
    step = iter(system_arrays(along, sums_only=True))
    stepped = map_arrays(points, lambda a: a + 1e-30j * next(step), fixed=lambda a: a)  # S + i h D
    thetas = rng.uniform(-0.5, 1.5, size=(3, 4, 4))
    thetas[:, 3, :3] = thetas[:, 0, :3]  # a point sharing term 0's theta (its values computed once for both)
    for reml in (True, False):
        value, _, derivative = host_objective_and_gradient(points, reml, n=n[:, None], along=along)(thetas)
        expected = objective(thetas.astype(complex), stepped, reml, n[:, None])
        np.testing.assert_allclose(value, expected.real, rtol=1e-12)
        np.testing.assert_allclose(derivative, expected.imag / 1e-30, rtol=1e-8,
                                   atol=1e-10 * np.abs(expected.imag / 1e-30).max())


def test_the_rule_puts_float64_batches_on_one_cpu_device_on_the_host():
    import jax

    from hierpool.batch import fit_terms

    assert fit_terms._on_host(np.float64, None) == (jax.default_backend() == "cpu")
    assert not fit_terms._on_host(np.float32, None)
    assert not fit_terms._on_host(np.float64, object())  # a mesh's sharding: compiled, each device its rows


@pytest.mark.parametrize("fault", ["nan", "indefinite"])
def test_a_dataset_whose_system_is_broken_fails_alone_on_the_host(crossed, fault):
    """The host optimizer and solve of a chunk in which one dataset's system is NaN, or indefinite at every theta:
    that dataset has no estimates (not a NumPy error for the whole chunk), the others exactly those they have
    without it (a stack's Cholesky factors do not depend on their neighbours)."""
    from hierpool.algebra.batched_systems import shared_grid
    from hierpool.algebra.linalg import theta_start
    from hierpool.algebra.search.terms import fit_on_host
    from hierpool.batch.plan import plan_batch

    plan = plan_batch(CROSSED, crossed[0], "rep", "fit_batch", "hp.lmm", one_term=False)
    (members, systems, n), = plan.term_systems([0, 1, 3, 4])
    chunk = shared_grid(systems, np.arange(len(members)))
    broken = dataclasses.replace(chunk, rest=chunk.rest.copy())
    broken.rest[1] = np.nan if fault == "nan" else -1e6 * np.eye(broken.rest.shape[-1])
    start = np.tile(theta_start((1, 1)), (len(members), 1))
    results = []
    for system in (chunk, broken):
        results.append(fit_on_host(system, n, start, reml=True, max_iterations=60))
    good, bad = results
    # no step improves on +inf (the compiled newton's start value too): not converged, no estimates
    assert not np.isfinite(bad["objective"][1]) and not bad["converged"][1] and np.isnan(bad["beta"][1]).all()
    others = [0, 2, 3]
    assert good["converged"].all()
    for name in ("objective", "theta", "beta", "sigma", "vcov"):
        np.testing.assert_array_equal(bad[name][others], good[name][others], err_msg=name)
    for t in range(2):
        np.testing.assert_array_equal(bad["b"][t][others], good["b"][t][others])


def test_spatial_terms_without_their_graph_are_refused_by_name():
    with pytest.raises(ArgumentError, match=r"car\(area, type='bym2'\) needs the areas' neighbourhood graph"):
        hp.fit_batch("y ~ 1 + car(area)", pd.DataFrame({"y": [1.0, 2.0], "area": ["a", "b"], "rep": [0, 0]}),
                     by="rep")


def test_progress_across_chunks_only_when_asked(crossed, capsys, monkeypatch):
    import sys

    from hierpool.batch import fit_terms, plan

    frames, _ = crossed
    updates = []

    class Bar:
        def __init__(self, *args):
            self.bar = plan.progress_bar(*args)

        def __enter__(self):
            self.bar.__enter__()
            return self

        def __exit__(self, *exc):
            return self.bar.__exit__(*exc)

        def update(self, n):
            updates.append(n)
            self.bar.update(n)

    monkeypatch.setattr(fit_terms, "progress_bar", Bar)
    with monkeypatch.context() as patched:  # a bar not shown imports no tqdm: its import would fail here
        patched.setitem(sys.modules, "tqdm.auto", None)
        hp.fit_batch(CROSSED, frames[:3], by="rep", chunk_size=1, progress=False)
    assert "fit_batch" not in capsys.readouterr().err
    hp.fit_batch(CROSSED, frames[:3], by="rep", chunk_size=1, progress=True)
    assert "3/3" in capsys.readouterr().err
    assert updates == [1, 1, 1] * 2  # chunk by chunk


def _nested_slope_frames(seed: int, count: int = 40) -> list:
    """--lmm-slopes-nested's shape: y ~ x + (1 + x | g) + (1 | g:h), 12 groups x 4 subgroups x 4 rows, the
    groups' intercept sd small against their slope's (near-singular fits, correlations near +-1)."""
    rng = np.random.default_rng(seed)
    g, h = np.repeat(np.arange(12), 16), np.tile(np.repeat(np.arange(4), 4), 12)
    frames = []
    for _ in range(count):
        x = rng.normal(size=g.size)
        b = rng.normal(size=(12, 2)) @ np.array([[0.2, 0.0], [0.5, 0.6]]).T
        y = 1 + 0.5 * x + b[g, 0] + b[g, 1] * x + rng.normal(0, 0.8, 48)[g * 4 + h] + rng.normal(size=g.size)
        frames.append(pd.DataFrame({"g": g.astype(str), "h": h.astype(str), "x": x, "y": y}))
    return frames


def test_a_stalled_search_restarts_from_its_rank_reduced_theta_to_hp_lmm_s_optimum(monkeypatch):
    from hierpool.algebra.search import terms as terms_search

    formula = "y ~ x + (1 + x | g) + (1 | g:h)"
    frames = _nested_slope_frames(4)
    restarted = hp.fit_batch(formula, frames, by="rep", progress=False, polish=False)
    # restart where it stopped
    monkeypatch.setattr(terms_search, "rank_reduced_theta", lambda theta, ks, terms=None: theta)
    stalled = hp.fit_batch(formula, frames, by="rep", progress=False, polish=False)
    crawled = np.flatnonzero(~stalled.converged.to_numpy())
    assert crawled.size, "no search stalled on these datasets: the test shows nothing"
    assert restarted.converged.all() and not restarted.refit.any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # singular fits
        for d in crawled:
            single = hp.lmm(formula, frames[d])
            assert restarted.objective.iloc[d] <= single.objective + 1e-9 * abs(single.objective), d
            assert stalled.objective.iloc[d] > restarted.objective.iloc[d]


def test_a_stalled_search_goes_on_from_where_it_is_when_its_rank_reduced_theta_is_worse(monkeypatch):
    # the restart is taken only where the criterion at the rank-reduced theta is no higher than where the search is
    # (to RESTART_TOLERANCE): a far-off point is refused, and the second run starts from the first run's end
    from hierpool.algebra.search import terms as terms_search

    stopped_at, starts = [], []
    real_search = terms_search.optimize_on_host

    def far_off(theta, ks, terms=None):
        stopped_at.append(theta.copy())
        return theta + 3.0

    def recording(value_and_grad, theta0, passes, ks, **options):
        starts.append(theta0.copy())
        return real_search(value_and_grad, theta0, passes, ks, **options)

    monkeypatch.setattr(terms_search, "rank_reduced_theta", far_off)
    monkeypatch.setattr(terms_search, "optimize_on_host", recording)
    fits = hp.fit_batch("y ~ x + (1 + x | g) + (1 | g:h)", _nested_slope_frames(4), by="rep", progress=False,
                        polish=False)
    assert stopped_at, "no search stalled on these datasets: the test shows nothing"
    assert len(starts) == 2 * len(stopped_at)  # per chunk, the first run and the second (chunks run in threads)
    for ended in stopped_at:
        assert any(start.shape == ended.shape and np.array_equal(start, ended) for start in starts)
    assert np.isfinite(fits.objective).all()


def _two_slope_term_frames(count: int, seed: int) -> list[pd.DataFrame]:
    """y ~ x + (1 + x | a) + (1 + x | a:b), 10 a x 4 b x 5 rows: two vector terms, nested."""
    rng = np.random.default_rng(seed)
    a, b = np.repeat(np.arange(10), 20), np.tile(np.repeat(np.arange(4), 5), 10)
    frames = []
    for _ in range(count):
        x = rng.normal(size=a.size)
        ua = rng.normal(size=(10, 2)) @ np.array([[0.6, 0.0], [0.1, 0.3]]).T
        uab = rng.normal(size=(40, 2)) @ np.array([[0.8, 0.0], [0.2, 0.5]]).T
        y = (1 + 0.5 * x + ua[a, 0] + ua[a, 1] * x + uab[a * 4 + b, 0] + uab[a * 4 + b, 1] * x
             + rng.normal(size=a.size))
        frames.append(pd.DataFrame({"a": a.astype(str), "b": b.astype(str), "x": x, "y": y}))
    return frames


def test_a_stalled_search_restarts_with_one_vector_term_reduced_where_reducing_every_one_is_worse(monkeypatch):
    # the search crawls towards the boundary of (1 + x | a) while (1 + x | a:b) is well determined: reducing both
    # raises the criterion (no restart: the crawl ran to the cap, and hp.lmm refitted), reducing a's alone converges.
    # This crawl is the damping's: with the gentler fall after a rejection (optimize.DAMPING_FALL_AFTER_REJECTION)
    # the old rule (every vector term reduced at once) leaves none of 300 such datasets unconverged, so the tenfold
    # fall of before makes the stall this test's restart is for
    from hierpool.algebra.linalg import rank_reduced_theta
    from hierpool.algebra.search import newton as optimize
    from hierpool.algebra.search import terms as terms_search

    monkeypatch.setattr(optimize, "DAMPING_FALL_AFTER_REJECTION", optimize.DAMPING_FALL)

    formula = "y ~ x + (1 + x | a) + (1 + x | a:b)"
    frames = _two_slope_term_frames(21, seed=1)
    frames = [frames[20], frames[3]]  # the first stalls, the second converges in the first run
    restarted = hp.fit_batch(formula, frames, by="rep", progress=False, polish=False, reml=False)
    monkeypatch.setattr(terms_search, "restart_candidates",
                        lambda theta, ks: rank_reduced_theta(theta, ks)[:, None, :])  # every vector term at once
    every_term = hp.fit_batch(formula, frames, by="rep", progress=False, polish=False, reml=False)
    assert not every_term.converged.iloc[0] and every_term.converged.iloc[1]
    assert restarted.converged.all()
    assert restarted.objective.iloc[0] < every_term.objective.iloc[0] - 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a singular fit
        single = hp.lmm(formula, frames[0], reml=False)
    assert restarted.objective.iloc[0] <= single.objective + 1e-9 * abs(single.objective)


def test_restart_candidates_reduce_each_vector_term_alone_then_all():
    from hierpool.algebra.linalg import rank_reduced_theta
    from hierpool.algebra.search.terms import restart_candidates

    ks = (2, 1, 3)
    theta = np.random.default_rng(0).normal(size=(4, 3 + 1 + 6))
    candidates = restart_candidates(theta, ks)
    assert candidates.shape == (4, 3, 10)
    every = rank_reduced_theta(theta, ks)
    assert not np.allclose(every[:, :3], theta[:, :3]) and not np.allclose(every[:, 4:], theta[:, 4:])
    np.testing.assert_array_equal(candidates[:, 0, 3:], theta[:, 3:])  # term 0 alone
    np.testing.assert_array_equal(candidates[:, 0, :3], every[:, :3])
    np.testing.assert_array_equal(candidates[:, 1, :4], theta[:, :4])  # term 2 alone
    np.testing.assert_array_equal(candidates[:, 1, 4:], every[:, 4:])
    np.testing.assert_array_equal(candidates[:, 2], every)  # both
    assert restart_candidates(theta[:, :4], (2, 1)).shape == (4, 1, 4)  # one vector term: one candidate


def test_a_restarted_search_that_stops_at_a_saddle_is_not_reported_converged():
    # the restart starts next to the stationary points of T_kk = 0: a stop where the curvature has a negative
    # direction (beyond the differences' error) is a saddle, and that dataset is left to hp.lmm's refit
    from hierpool.algebra.search.terms import negative_curvature

    curvature = np.array([np.diag([4.0, 1.0]), np.diag([4.0, -0.5]), np.diag([4.0, -1e-9]), np.full((2, 2), np.nan)])
    np.testing.assert_array_equal(negative_curvature(curvature), [False, True, False, False])


def test_uncorrelated_slopes_are_one_block_diagonal_term_on_the_host(monkeypatch):
    """(1 + x || g): two terms on one factor, searched on the host as one term whose factor is diagonal
    (terms_search.fit_on_host's term_ks); each dataset equals hp.lmm term by term, and the terms kept apart
    (forced) reach the same optima."""
    from hierpool.batch import fit_terms

    formula = "y ~ x + (1 + x || g)"
    rng = np.random.default_rng(12)
    frames = []
    for d in range(3):
        g = np.repeat(np.arange(10 - d), 8)
        x = rng.normal(size=g.size)
        a, s = rng.normal(0, 0.8, 10), rng.normal(0, 0.4 * (d != 1), 10)  # dataset 1: no slope variance (singular)
        frames.append(pd.DataFrame(dict(g=[f"g{i}" for i in g], x=x, y=1 + 0.5 * x + a[g] + s[g] * x
                                        + rng.normal(size=g.size))))
    seen = []
    search = fit_terms.fit_on_host
    monkeypatch.setattr(fit_terms, "fit_on_host", lambda systems, *a: seen.append(systems.layout.ks)
                        or search(systems, *a))
    batch = hp.fit_batch(formula, frames, by="rep", progress=False)
    assert seen and all(ks == (2,) for ks in seen)  # one term of two columns
    assert batch.converged.all() and not batch.refit.any(), batch.messages.tolist()
    for d, frame in enumerate(frames):
        fit = _single(formula, frame)
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-8)
        assert bool(batch.is_singular.iloc[d]) == fit.is_singular
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6, atol=1e-8)
        for j, (term, cov, name) in enumerate(zip(batch.terms, fit.term_covariances(), ["Intercept", "x"])):
            scale = max(np.abs(cov).max(), fit.sigma**2)
            np.testing.assert_allclose(term.covariance[d], cov, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{j}, {d}")
            rows = fit.ranef[fit.ranef["term"] == name]
            # to 1e-5 of their scale (dataset 1's slope sd is near zero, where the criterion is flat in it)
            np.testing.assert_allclose(term.b[d][:, 0], rows["condval"].to_numpy(), rtol=1e-5,
                                       atol=1e-5 * np.sqrt(scale), err_msg=f"BLUPs of term {j}, {d}")
            np.testing.assert_allclose(term.cond_sd[d][:, 0], rows["condsd"].to_numpy(), rtol=1e-5,
                                       atol=1e-5 * np.sqrt(scale), err_msg=f"cond. sds of term {j}, {d}")
    seen.clear()
    monkeypatch.setattr(fit_terms, "merged_widths", lambda plan: None)
    apart = hp.fit_batch(formula, frames, by="rep", progress=False)
    assert seen and all(ks == (1, 1) for ks in seen)
    assert_terms_kept_apart_agree(batch, apart)
    for merged_term, apart_term in zip(batch.terms, apart.terms):  # the same BLUPs as the terms apart
        for d in range(3):
            np.testing.assert_allclose(merged_term.b[d], apart_term.b[d], rtol=1e-4, atol=1e-5)
    # a vector term and a scalar term on one factor: blocks of 2 x 2 and 1 x 1, against the terms apart and hp.lmm
    formula = "y ~ x + (x | g) + (0 + z | g)"
    frames = [frame.assign(z=np.random.default_rng(d).normal(size=len(frame))) for d, frame in enumerate(frames)]
    apart = hp.fit_batch(formula, frames, by="rep", progress=False)
    monkeypatch.undo()
    seen.clear()
    monkeypatch.setattr(fit_terms, "fit_on_host", lambda systems, *a: seen.append(systems.layout.ks)
                        or search(systems, *a))
    batch = hp.fit_batch(formula, frames, by="rep", progress=False)
    assert seen and all(ks == (3,) for ks in seen) and batch.theta.shape[1] == 4
    assert_terms_kept_apart_agree(batch, apart)
    for d, frame in enumerate(frames):
        assert batch.objective.iloc[d] == pytest.approx(_single(formula, frame).objective, rel=1e-8)


def test_uncorrelated_slopes_with_weights_and_an_offset_equal_their_single_fits():
    # terms on one factor searched as one block-diagonal term, with prior weights and an offset in the statistics
    rng, frames = uncorrelated_slope_frames(5, 2, sd_intercept=0.8, sd_slope=0.4)
    for frame in frames:
        frame["w"], frame["o"] = rng.uniform(0.5, 2, len(frame)), rng.normal(0, 0.3, len(frame))
        frame["y"] = 1 + 0.5 * frame.x + frame.a + frame.s * frame.x + rng.normal(size=len(frame))
    formula = "y ~ x + (1 + x || g)"
    batch = hp.fit_batch(formula, frames, by="rep", weights="w", offset="o", progress=False)
    assert batch.converged.all() and not batch.refit.any()
    for d, frame in enumerate(frames):
        fit = _single(formula, frame, weights="w", offset="o")
        assert batch.objective.iloc[d] == pytest.approx(fit.objective, rel=1e-10)
        np.testing.assert_allclose(batch.beta[d], fit.fixef.to_numpy(), rtol=1e-6, atol=1e-8)
