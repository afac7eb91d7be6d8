"""The blocked algorithms against plain dense linear algebra, written independently here."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.linalg
from conftest import load, simulated

import hierpool as hp
from hierpool.algebra.compiler_options import compile_lowered
from hierpool.algebra.linalg import theta_to_factors
from hierpool.closedform import objective, prediction_covariance
from hierpool.pooling_comparison import group_coefficient_sd, group_terms

STRUCTURES = [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)"),
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)"),
    ("Pastes", "strength ~ 1 + (1 | batch/cask)"),
    ("Machines", "score ~ Machine + (Machine | Worker)"),  # k = 3
    ("sleepstudy", "Reaction ~ Days + (Days | Subject) + (Days | Days)"),  # vector terms in the rest
]


def quick_compiled(jitted, *args, **static):
    """``jitted`` (a ``jax.jit`` function) compiled for ``args`` as hierpool compiles its short-running programs,
    without LLVM's optimization (``compiler_options(quick=True)``): the same XLA program, its numbers equal to
    rounding, compiled in a fraction of the time.  Called with ``args`` alone (``static`` is baked in)."""
    return compile_lowered(jitted.lower(*args, **static), quick=True)


def dense_model(model, theta):
    """Z Lambda, X, y and the full MME matrix, built densely."""
    design = model.design
    factors = theta_to_factors(jnp.asarray(theta), tuple(t.k for t in design.terms))
    blocks, lambdas = [], []
    for term, factor in zip(design.terms, factors):
        Z = np.zeros((design.n, term.n_levels * term.k))
        for a in range(term.k):
            Z[np.arange(design.n), term.index * term.k + a] = term.z[:, a]
        blocks.append(Z)
        lambdas.append(np.kron(np.eye(term.n_levels), np.asarray(factor)))
    ZL = np.hstack(blocks) @ scipy.linalg.block_diag(*lambdas)
    q = ZL.shape[1]
    C = np.block([[ZL.T @ ZL + np.eye(q), ZL.T @ design.X], [design.X.T @ ZL, design.X.T @ design.X]])
    return ZL, C


def dense_reml(model, theta):
    design = model.design
    n, p = design.n, design.p
    ZL, C = dense_model(model, theta)
    q = ZL.shape[1]
    solution = np.linalg.solve(C, np.concatenate([ZL.T @ design.y, design.X.T @ design.y]))
    u, beta = solution[:q], solution[q:]
    r2 = np.sum((design.y - design.X @ beta - ZL @ u) ** 2) + u @ u
    logdet_c = np.linalg.slogdet(C)[1]
    return logdet_c + (n - p) * (1 + np.log(2 * np.pi * r2 / (n - p)))


@pytest.mark.parametrize("name,formula", STRUCTURES)
def test_objective_and_gradient_match_dense(name, formula):
    model = hp.MixedModel(formula, load(name))
    theta = np.random.default_rng(0).uniform(0.2, 1.5, model.n_theta)
    value, grad = model.objective_and_gradient(theta)
    assert value == pytest.approx(dense_reml(model, theta), rel=1e-11)
    step = 1e-6
    numeric = [
        (dense_reml(model, theta + step * e) - dense_reml(model, theta - step * e)) / (2 * step)
        for e in np.eye(theta.size)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,formula", STRUCTURES)
def test_prediction_covariance_is_the_inverse_mme_matrix(name, formula):
    model = hp.MixedModel(formula, load(name))
    theta = np.random.default_rng(1).uniform(0.2, 1.5, model.n_theta)
    _, C = dense_model(model, theta)
    inverse = np.linalg.inv(C)
    blocks = prediction_covariance(theta, model.system)  # the host path; test_host_and_compiled_paths_agree: compiled
    k0, ell0 = model.design.terms[0].k, model.design.terms[0].n_levels
    q0 = k0 * ell0
    np.testing.assert_allclose(blocks.rest, inverse[q0:, q0:], atol=1e-10)
    for level in range(ell0):
        rows = slice(level * k0, (level + 1) * k0)
        np.testing.assert_allclose(blocks.term0[level], inverse[rows, rows], atol=1e-10)
        np.testing.assert_allclose(blocks.cross[level], inverse[rows, q0:], atol=1e-10)


def test_blups_and_condsd_match_dense(sleepstudy):
    fit = hp.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    ZL, C = dense_model(hp.MixedModel(fit.design.spec.formula, sleepstudy), fit.theta)
    q = ZL.shape[1]
    design = fit.design
    solution = np.linalg.solve(C, np.concatenate([ZL.T @ design.y, design.X.T @ design.y]))
    np.testing.assert_allclose(fit.fixef.to_numpy(), solution[q:], rtol=1e-10)
    lam = scipy.linalg.block_diag(*[np.asarray(fit.solution.factors[0])] * 18)
    b = lam @ solution[:q]
    np.testing.assert_allclose(np.asarray(fit.solution.b[0]).ravel(), b, atol=1e-9)
    cond = fit.sigma**2 * lam @ np.linalg.inv(ZL.T @ ZL + np.eye(q)) @ lam.T
    np.testing.assert_allclose(np.asarray(fit.solution.cond_var[0]).reshape(18, 2, 2)[:, 0, 0], np.diag(cond)[::2], rtol=1e-9)


def test_prediction_intervals_existing_and_new_groups(sleepstudy):
    fit = hp.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy)
    model = hp.MixedModel(fit.design.spec.formula, sleepstudy)
    ZL, C = dense_model(model, fit.theta)
    inverse = np.linalg.inv(C)
    row = sleepstudy.iloc[[13]]  # Subject 309, Days 3
    v = np.concatenate([ZL[13], fit.design.X[13]])
    expected_conf = fit.sigma**2 * v @ inverse @ v
    conf = fit.predict(row, interval="confidence", level=0.9)
    pred = fit.predict(row, interval="prediction", level=0.9)
    assert conf.se.item() ** 2 == pytest.approx(expected_conf, rel=1e-9)
    assert pred.se.item() ** 2 == pytest.approx(expected_conf + fit.sigma**2, rel=1e-9)
    assert conf.upper.item() - conf.fit.item() == pytest.approx(1.6448536 * conf.se.item(), rel=1e-6)
    # an unseen subject: population-level fit, random-effect variance added, no BLUP covariance
    new = row.assign(Subject=999)
    new_pred = fit.predict(new, interval="prediction")
    x = fit.design.X[13]
    sigma_b = fit.term_covariances()[0]
    z = np.array([1.0, 3.0])
    expected = x @ fit.vcov.to_numpy() @ x + z @ sigma_b @ z + fit.sigma**2
    assert new_pred.fit.item() == pytest.approx(x @ fit.fixef.to_numpy(), rel=1e-12)
    assert new_pred.se.item() ** 2 == pytest.approx(expected, rel=1e-9)
    population = fit.predict(row, re=False, interval="confidence")
    assert population.se.item() ** 2 == pytest.approx(x @ fit.vcov.to_numpy() @ x, rel=1e-9)


def test_shrinkage_weights_reproduce_blups():
    data = simulated(seed=3)
    fit = hp.lmm("y ~ x + (1 | g) + (1 | h)", data)
    table = fit.shrinkage()
    assert set(table.grpvar) == {"g", "h"}
    np.testing.assert_allclose(table.blup, table.weight * table.raw_dev, rtol=1e-9, atol=1e-12)
    assert ((table.weight > 0) & (table.weight < 1)).all()
    one = hp.lmm("y ~ 1 + (1 | g)", data)
    sigma_b2 = one.varcorr.vcov.iloc[0]
    row = one.shrinkage().iloc[0]
    assert row.weight == pytest.approx(row.n * sigma_b2 / (row.n * sigma_b2 + one.sigma**2), rel=1e-12)


def test_icc(sleepstudy):
    fit = hp.lmm("Reaction ~ Days + (1 | Subject)", sleepstudy)
    var_b = fit.varcorr.vcov.iloc[0]
    assert fit.icc()["Subject"] == pytest.approx(var_b / (var_b + fit.sigma**2), rel=1e-12)
    with pytest.raises(hp.HierpoolError, match="scalar random-intercept"):
        hp.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy).shrinkage()


def test_objective_is_pure_jittable_and_vmappable():
    """Two data sets with the same layout: vmap over their systems equals separate evaluations."""
    first = hp.MixedModel("y ~ x + (x | g)", simulated(seed=1))
    second = hp.MixedModel("y ~ x + (x | g)", simulated(seed=2))
    assert first.system.layout == second.system.layout
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), first.system, second.system)
    theta = jnp.array([0.8, 0.1, 0.4])
    batched = jax.jit(jax.vmap(lambda s: objective(theta, s)))(stacked)
    np.testing.assert_allclose(batched, [first.objective(theta), second.objective(theta)], rtol=1e-12)
    assert batched.dtype == jnp.float64


def test_at_theta_is_the_fit_at_the_optimum(sleepstudy):
    model = hp.MixedModel("Reaction ~ Days + (Days | Subject)", sleepstudy)
    fit = model.fit()
    fixed = model.at(fit.theta)
    pd.testing.assert_frame_equal(fixed.ranef, fit.ranef)
    assert fixed.objective == pytest.approx(fit.objective, rel=1e-14)


def test_summary_reads_like_lme4(sleepstudy):
    text = hp.lmm("Reaction ~ Days + (Days | Subject)", sleepstudy).summary()
    assert "REML criterion at convergence: 1743.6283" in text
    assert "Number of obs: 180, groups:  Subject, 18" in text
    assert "Residual" in text and "Fixed effects" in text


def test_spd_inverse_lapack_and_solve_paths_agree():
    # 300 rows: the CPU LAPACK potri path; 100 rows: triangular solves (also under vmap)
    from hierpool.algebra.linalg import _inverse_by_solves, spd_inverse_from_cholesky

    rng = np.random.default_rng(3)
    for size in (100, 300):
        a = rng.normal(size=(size, size))
        spd = a @ a.T + size * np.eye(size)
        chol = jnp.asarray(np.linalg.cholesky(spd))
        expected = np.linalg.inv(spd)
        jitted = np.asarray(jax.jit(spd_inverse_from_cholesky)(chol))
        np.testing.assert_allclose(jitted, expected, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(jitted, np.asarray(jax.jit(_inverse_by_solves)(chol)), rtol=1e-10, atol=1e-14)
        batched = np.asarray(jax.jit(jax.vmap(spd_inverse_from_cholesky))(jnp.stack([chol, 2 * chol])))
        np.testing.assert_allclose(batched[1], expected / 4, rtol=1e-10, atol=1e-14)


def test_gradient_with_a_large_rest_block_matches_finite_differences():
    # second crossed term of 300 levels: the rest block exceeds the LAPACK-inverse threshold
    rng = np.random.default_rng(5)
    n = 3000
    a, b = rng.integers(0, 400, n), rng.integers(0, 300, n)
    y = rng.normal(0, 1.0, 400)[a] + rng.normal(0, 0.5, 300)[b] + rng.normal(size=n)
    data = pd.DataFrame({"y": y, "a": a, "b": b})
    model = hp.MixedModel("y ~ 1 + (1 | a) + (1 | b)", data)
    assert model.system.layout.q_rest >= 256
    theta = np.array([0.8, 0.4])
    _, grad = model.objective_and_gradient(theta)
    step = 1e-5
    numeric = [
        (model.objective(theta + step * e) - model.objective(theta - step * e)) / (2 * step) for e in np.eye(2)
    ]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,formula", STRUCTURES[:3])
def test_joint_sd_is_the_dense_mme_inverse(name, formula):
    fit = hp.lmm(formula, load(name))
    model = hp.MixedModel(formula, load(name))
    ZL, C = dense_model(model, fit.theta)
    q = ZL.shape[1]
    factors = theta_to_factors(jnp.asarray(fit.theta), tuple(t.k for t in model.design.terms))
    lam = scipy.linalg.block_diag(*[np.kron(np.eye(t.n_levels), np.asarray(f)) for t, f in zip(model.design.terms, factors)])
    cov_b = fit.sigma**2 * lam @ np.linalg.inv(C)[:q, :q] @ lam.T
    # dense order: term, level, coefficient; ranef order: term, coefficient, level
    expected = []
    offset = 0
    for term in model.design.terms:
        diag = np.diag(cov_b)[offset : offset + term.n_levels * term.k].reshape(term.n_levels, term.k)
        expected.extend(np.sqrt(diag[:, i]) for i in range(term.k))
        offset += term.n_levels * term.k
    np.testing.assert_allclose(fit.ranef_joint_sd(), np.concatenate(expected), rtol=1e-8)


@pytest.mark.parametrize("name,formula", STRUCTURES + [("sleepstudy", "Reaction ~ Days + (Days || Subject)")])
def test_host_and_compiled_paths_agree(name, formula):
    # one algebra, two ways to run it: NumPy on the host (small models) and compiled XLA programs
    from hierpool.algebra.criterion import objective_and_grad, objective_and_gradient_on_host
    from hierpool.algebra.henderson import prediction_covariance, prediction_covariance_jit, solve, solve_jit
    from hierpool.algebra.system import on_host

    data = load(name)
    data = data.assign(w=np.random.default_rng(3).uniform(0.5, 2.0, len(data)))
    model = hp.MixedModel(formula, data, weights="w")
    host = on_host(model.system)
    theta = np.random.default_rng(2).uniform(0.2, 1.5, model.n_theta)
    # each compiled program costs seconds to build: ML (which differs from REML only in the shared
    # final formula, profiled_criterion) and the whole compiled fit are compared on the first structure;
    # the programs are the library's, compiled without LLVM's optimization (quick_compiled) but the fit's
    first = (name, formula) == STRUCTURES[0]
    args = (jnp.asarray(theta), model.system)
    for reml in (True, False) if first else (True,):
        value, grad = objective_and_gradient_on_host(theta, host, reml)
        compiled_value, compiled_grad = quick_compiled(objective_and_grad, *args, reml=reml)(*args)
        assert value == pytest.approx(float(compiled_value), rel=1e-12)
        np.testing.assert_allclose(grad, compiled_grad, rtol=1e-10, atol=1e-10 * np.max(np.abs(grad)))
    on_cpu, compiled = solve(theta, host), jax.tree_util.tree_map(np.asarray, quick_compiled(solve_jit, *args)(*args))
    for a, b in zip(jax.tree_util.tree_leaves(on_cpu), jax.tree_util.tree_leaves(compiled)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-10 * max(1.0, np.max(np.abs(b), initial=0.0)))
    blocks = prediction_covariance(theta, host)
    compiled_blocks = quick_compiled(prediction_covariance_jit, *args)(*args)
    for a, b in zip(jax.tree_util.tree_leaves(blocks), jax.tree_util.tree_leaves(compiled_blocks)):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    if first:
        fit_host = model.fit(control=hp.Control(compile=False))
        fit_compiled = model.fit(control=hp.Control(compile=True))
        assert fit_host.objective == pytest.approx(fit_compiled.objective, rel=1e-10)
        np.testing.assert_allclose(fit_host.theta, fit_compiled.theta, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("formula,extra", [
    ("Reaction ~ Days + (Days | Subject)", dict(weights="w", offset="o")),
    ("Reaction ~ Days + (1 | Subject)", dict(se="s")),
    ("Reaction ~ 1 + (Days + I(Days**2) | Subject)", dict(weights="w")),  # k = 3
    ("Reaction ~ C(Days) + (1 | Subject)", dict(offset="o")),  # p = 10: past the unrolled Cholesky
    ("Reaction ~ 0 + (Days | Subject)", dict(offset="o")),  # p = 0: y's coupling alone
])
def test_one_term_specialisation_equals_the_general_path(formula, extra):
    # the one-term criterion (sufficient statistics, complex-step gradient) is the general
    # blocked criterion (adjoint gradient) of the same model, with weights, offsets and se=
    from hierpool.algebra import one_term
    from hierpool.algebra.batched_systems import statistics_systems
    from hierpool.algebra.criterion import host_objective_and_gradient, objective_and_gradient_on_host
    from hierpool.algebra.statistics import one_dataset_statistics

    rng = np.random.default_rng(5)
    data = load("sleepstudy")
    data = data.assign(w=rng.uniform(0.5, 2.0, len(data)), o=rng.normal(0, 5, len(data)),
                       s=rng.uniform(20, 40, len(data)))
    model = hp.MixedModel(formula, data, **extra)
    stats = one_dataset_statistics(model.design)
    sigma_known = model.design.sigma_known
    points = rng.uniform(-0.5, 1.5, (3, model.n_theta))
    points[0, 0] = 0.0  # a boundary point
    # hp.fit_batch's one-term host search: the general criterion of the statistics' systems, a batch of one
    batch = statistics_systems(stats.map_arrays(lambda a: np.asarray(a)[None, None]), sigma_known)
    for reml in (True, False):
        values, gradients = one_term.value_and_gradient(points, stats, reml, sigma_known)
        batch_values, batch_gradients = host_objective_and_gradient(batch, reml, n=np.asarray(stats.n)[None, None])(
            points[None])
        for theta, value, gradient, batch_value, batch_gradient in zip(points, values, gradients, batch_values[0],
                                                                        batch_gradients[0]):
            general_value, general_gradient = objective_and_gradient_on_host(theta, model.system, reml)
            assert value == pytest.approx(general_value, rel=1e-11)
            assert batch_value == pytest.approx(general_value, rel=1e-11)
            scale = 1e-9 * np.max(np.abs(general_gradient))
            np.testing.assert_allclose(gradient, general_gradient, rtol=1e-8, atol=scale)
            np.testing.assert_allclose(batch_gradient, general_gradient, rtol=1e-8, atol=scale)
    from hierpool.algebra.henderson import solve

    theta = np.abs(points[1])
    for reml in (True, False):
        special, general = one_term.solution(theta, stats, reml, sigma_known), solve(theta, model.system, reml)
        for name in ("beta", "vcov_beta", "sigma", "pwrss", "logdet_lz", "logdet_rx"):
            np.testing.assert_allclose(getattr(special, name), getattr(general, name), rtol=1e-10, err_msg=name)
        for name in ("factors", "u", "b", "cond_var"):
            np.testing.assert_allclose(getattr(special, name)[0], getattr(general, name)[0], rtol=1e-9,
                                       atol=1e-10 * np.max(np.abs(getattr(general, name)[0])), err_msg=name)
    fit = model.fit()  # the host fit optimizes the specialisation: its optimum is the general path's
    value, gradient = objective_and_gradient_on_host(fit.theta, model.system, True)
    assert fit.objective == pytest.approx(value, rel=1e-11)
    free = ~((fit.theta <= 0) & (gradient > 0)) & np.isfinite(fit.theta)
    assert np.max(np.abs(gradient[free]), initial=0.0) < 1e-4  # a wrong criterion is off by O(1)


def test_one_term_host_fit_of_a_far_from_centred_covariate_is_the_centred_models():
    # x ~ 1e6: the statistics of the raw column lose ~12 digits in X^T X; the host path centres it
    # (centred_statistics) and maps beta and its covariance back, so it is the model y ~ (x - mean)
    rng = np.random.default_rng(5)
    g = rng.integers(0, 15, 200)
    x = 1e6 + rng.normal(size=200)
    data = pd.DataFrame({"g": g.astype(str), "x": x, "y": rng.normal(size=15)[g] + x + rng.normal(size=200)})
    data["xc"] = data.x - data.x.mean()
    raw, centred = hp.lmm("y ~ x + (1 | g)", data), hp.lmm("y ~ xc + (1 | g)", data)
    assert raw.converged
    assert raw.objective == pytest.approx(centred.objective, rel=1e-11)
    np.testing.assert_allclose(raw.theta, centred.theta, rtol=1e-8)
    assert raw.fixef["x"] == pytest.approx(centred.fixef["xc"], rel=1e-9)
    assert raw.fixef["Intercept"] == pytest.approx(centred.fixef["Intercept"] - data.x.mean() * centred.fixef["xc"],
                                                   rel=1e-9)
    assert raw.fixef_se["x"] == pytest.approx(centred.fixef_se["xc"], rel=1e-8)
    np.testing.assert_allclose(raw.fitted, centred.fitted, rtol=1e-10)


def test_a_model_without_fixed_effects_fits_on_the_host_as_compiled():
    rng = np.random.default_rng(1)
    data = pd.DataFrame({"g": rng.integers(0, 10, 100).astype(str), "y": rng.normal(size=100)})
    host = hp.lmm("y ~ 0 + (1 | g)", data)
    compiled = hp.lmm("y ~ 0 + (1 | g)", data, control=hp.Control(compile=True))
    assert host.objective == pytest.approx(compiled.objective, rel=1e-10)
    np.testing.assert_allclose(host.theta, compiled.theta, rtol=1e-6)


@pytest.mark.parametrize("formula", [
    "y ~ x + (1 | g) + (1 | h)",
    "y ~ x + (x | g) + (1 | h)",  # k0 = 2
    "y ~ x + (1 | g) + (x | h)",  # a vector term in the rest
])
def test_dense_coupling_and_pair_products_give_the_same_criterion(formula):
    # the host criterion forms the Schur update from a dense coupling or from the pair products,
    # whichever is cheaper (system.dense_coupling_pays): both are the same algebra
    from hierpool.algebra.criterion import host_objective_and_gradient
    from hierpool.algebra.system import on_host

    rng = np.random.default_rng(4)
    n = 600
    g, h = rng.integers(0, 60, n), rng.integers(0, 12, n)
    x = rng.normal(size=n)
    data = pd.DataFrame({"g": g.astype(str), "h": h.astype(str), "x": x,
                         "y": x + rng.normal(size=60)[g] + rng.normal(size=12)[h] + rng.normal(size=n)})
    host = on_host(hp.MixedModel(formula, data, weights=rng.uniform(0.5, 2.0, n)).system)
    theta = rng.uniform(0.2, 1.5, host.layout.n_theta)
    for reml in (True, False):
        dense_value, dense_grad = host_objective_and_gradient(host, reml, dense=True)(theta)
        pair_value, pair_grad = host_objective_and_gradient(host, reml, dense=False)(theta)
        assert dense_value == pytest.approx(pair_value, rel=1e-12)
        np.testing.assert_allclose(dense_grad, pair_grad, rtol=1e-10, atol=1e-10 * np.max(np.abs(pair_grad)))


def test_compiled_programs_give_the_same_numbers_from_pairs_and_from_a_dense_coupling(monkeypatch):
    # small models' programs form the Schur update and its adjoint from a dense coupling scattered in
    # the program (criterion.coupling_in_program), large ones from the pair products: one algebra
    from hierpool.algebra import criterion
    from hierpool.algebra.criterion import objective
    from hierpool.algebra.henderson import solve

    data = load("sleepstudy")
    model = hp.MixedModel("Reaction ~ Days + (Days | Subject) + (Days | Days)", data)  # k0 = 2, vector rest term
    theta = jnp.asarray(np.random.default_rng(8).uniform(0.2, 1.5, model.n_theta))
    assert criterion.dense_coupling_pays(model.system)

    def compiled_numbers():  # a new function jitted (jit caches traces by function): nothing reused from the other form
        program = jax.jit(lambda t, s: (jax.value_and_grad(objective)(t, s), solve(t, s)))
        return jax.tree_util.tree_leaves(quick_compiled(program, theta, model.system)(theta, model.system))

    dense = compiled_numbers()
    asked = []
    monkeypatch.setattr(criterion, "dense_coupling_pays", lambda system: asked.append(1) or False)
    pairs = compiled_numbers()
    assert len(asked) >= 4  # update and adjoint in the criterion, update and contractions in the solve
    for a, b in zip(dense, pairs):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-11 * max(1.0, float(np.max(np.abs(b), initial=0.0))))


def test_point_estimates_are_the_solutions_without_its_variances():
    # henderson.point_estimates (a GLMM's PIRLS step) is solve's factorization and back-substitution
    from hierpool.algebra.henderson import point_estimates, solve
    from hierpool.algebra.system import on_host

    system = on_host(hp.MixedModel("Reaction ~ Days + (Days | Subject) + (1 | Days)", load("sleepstudy")).system)
    theta = np.array([0.9, 0.1, 0.3, 0.5])
    beta, u, b, logdet = point_estimates(theta, system)
    full = solve(theta, system)
    np.testing.assert_array_equal(beta, full.beta)
    for ours, theirs in zip((*u, *b), (*full.u, *full.b)):
        np.testing.assert_array_equal(ours, theirs)
    assert logdet == full.logdet_lz


def test_a_diagonal_block_lists_each_unordered_pair_once():
    # (h, h) within a level of g: c (c + 1) / 2 pairs of its c levels of h, not c^2 (system.Pairs);
    # the criterion's equality with the dense coupling (above) and lme4 checks the halved algebra
    rng = np.random.default_rng(6)
    g, h = rng.integers(0, 40, 400), rng.integers(0, 15, 400)
    data = pd.DataFrame({"g": g, "h": h, "y": rng.normal(size=400)})
    system = hp.MixedModel("y ~ 1 + (1 | g) + (1 | h)", data).system
    per_level = np.array([len(np.unique(h[g == level])) for level in range(40)])
    (h_h,) = [pairs for key, pairs in zip(system.layout.pair_keys(), system.pairs) if key == (0, 0)]
    assert len(h_h.target) == np.sum(per_level * (per_level + 1) // 2)


def test_a_compiler_option_xla_does_not_know_is_dropped_not_fatal(monkeypatch):
    # jaxlib 0.11 no longer knows xla_cpu_use_fusion_emitters: every compiled program of hierpool failed with
    # "No such compile option" on a CPU
    from hierpool.algebra import compiler_options

    monkeypatch.setattr(compiler_options, "CPU_OPTIONS", {"xla_hierpool_no_such_option": False,
                                                          **compiler_options.CPU_OPTIONS})
    monkeypatch.setattr(compiler_options, "UNKNOWN_OPTIONS", set())
    program = compiler_options.compile_lowered(jax.jit(lambda x: 2 * x).lower(jnp.ones(3)), "cpu")
    np.testing.assert_array_equal(program(jnp.ones(3)), 2.0)
    assert "xla_hierpool_no_such_option" in compiler_options.UNKNOWN_OPTIONS
    assert "xla_hierpool_no_such_option" not in compiler_options.compiler_options("cpu")

    class Raced:  # another thread found the option unknown while this compile ran with it: retried too
        calls = 0

        def compile(self, options):
            Raced.calls += 1
            if "xla_hierpool_other_option" in options:
                compiler_options.UNKNOWN_OPTIONS.add("xla_hierpool_other_option")
                raise RuntimeError("INVALID_ARGUMENT: No such compile option: 'xla_hierpool_other_option'")
            return "compiled"

    monkeypatch.setitem(compiler_options.CPU_OPTIONS, "xla_hierpool_other_option", 1)
    assert compiler_options.compile_lowered(Raced(), "cpu") == "compiled" and Raced.calls == 2

    class Failing:  # another compile error is raised as it is
        def compile(self, options):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        compiler_options.compile_lowered(Failing(), "cpu")


@pytest.mark.parametrize("on_cpu", [True, False])
def test_large_data_stay_on_the_host_of_a_cpu_for_their_memory(monkeypatch, on_cpu):
    # compile_pays: by work per evaluation, except that from HOST_MIN_ROWS rows a CPU fit stays on the host
    from hierpool.algebra import compiler_options
    from hierpool.algebra.compiler_options import COMPILE_MIN_FLOPS, HOST_MIN_ROWS, compile_pays

    monkeypatch.setattr(compiler_options, "default_backend_is_cpu", lambda: on_cpu)
    assert not compile_pays(COMPILE_MIN_FLOPS / 2, rows=1_000)
    assert compile_pays(COMPILE_MIN_FLOPS * 2, rows=HOST_MIN_ROWS - 1)
    assert compile_pays(COMPILE_MIN_FLOPS * 2, rows=HOST_MIN_ROWS) is not on_cpu


def test_whether_jax_runs_on_a_cpu_is_asked_of_jax_only_with_an_accelerator_plugin(monkeypatch):
    from hierpool.algebra import jax_runtime

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(jax_runtime, "loaded", lambda: False)
    monkeypatch.setattr(jax_runtime, "_accelerator_plugins_installed", lambda: False)
    assert jax_runtime.default_backend_is_cpu()  # nothing to ask
    monkeypatch.setattr(jax_runtime, "_accelerator_plugins_installed", lambda: True)
    import jax

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not jax_runtime.default_backend_is_cpu()  # a plugin: JAX decides
    monkeypatch.setenv("JAX_PLATFORMS", "cpu,cuda")
    assert jax_runtime.default_backend_is_cpu()  # the CPU named first
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(jax_runtime, "_accelerator_plugins_installed", jax_runtime.__dict__["_accelerator_plugins_installed"])
    monkeypatch.setenv("PJRT_NAMES_AND_LIBRARY_PATHS", "cuda:/opt/libpjrt_cuda.so")
    assert jax_runtime._accelerator_plugins_installed()  # a plugin named by JAX's environment variable


def test_host_products_and_solves_in_single_thread_pieces_are_the_plain_ones():
    from hierpool.algebra.linalg import host_product, solve_triangular, spd_inverse_from_cholesky, tri_inverse

    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(700, 210)), rng.normal(size=(700, 30))  # several row chunks
    np.testing.assert_allclose(host_product(a, b, transpose_a=True), a.T @ b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host_product(a[:, :40], b[:40]), a[:, :40] @ b[:40], rtol=1e-12, atol=1e-12)
    # NumPy's LU routines up to NUMPY_INVERSE_MAX_SIZE (128), SciPy's LAPACK and BLAS above: a C-ordered factor,
    # a Fortran-ordered one and a slice (BLAS gets the transpose of a C-ordered one, the triangle and op swapped)
    for size, order in ((12, "C"), (40, "C"), (200, "C"), (200, "F"), (200, "slice")):
        spd = a[:, :size].T @ a[:, :size] + np.eye(size)
        chol = np.linalg.cholesky(spd)
        chol = {"C": np.ascontiguousarray(chol), "F": np.asfortranarray(chol),
                "slice": np.pad(chol, ((0, 3), (0, 3)))[:size, :size]}[order]
        np.testing.assert_allclose(spd_inverse_from_cholesky(chol), np.linalg.inv(spd), rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(np.triu(tri_inverse(chol), 1), 0.0)
        np.testing.assert_allclose(tri_inverse(chol), scipy.linalg.solve_triangular(chol, np.eye(size), lower=True),
                                   rtol=1e-12, atol=1e-14)
        rhs = rng.normal(size=(size, 60))  # several column chunks
        stored = chol + np.triu(rng.normal(size=(size, size)), 1)  # LAPACK reads only the named triangle
        for trans in ("N", "T"):
            expected = scipy.linalg.solve_triangular(chol, rhs, lower=True, trans=trans)
            np.testing.assert_allclose(solve_triangular(stored, rhs, lower=True, trans=trans), expected, rtol=1e-12)
            np.testing.assert_allclose(solve_triangular(stored, rhs[:, 0], lower=True, trans=trans), expected[:, 0],
                                       rtol=1e-12)
    singular = np.tril(rng.normal(size=(5, 5)))
    singular[2, 2] = 0.0  # a zero pivot gives NaN on the host, as on the compiled path, not an exception
    assert np.isnan(tri_inverse(singular)).all() and np.isnan(solve_triangular(singular, rhs[:5], lower=True)).all()


@pytest.mark.parametrize("max_stack", [0, 1000])
def test_stacks_of_triangular_inverses_are_scipy_s_and_nan_at_a_zero_pivot(monkeypatch, max_stack):
    # the host inverts a stack of lower-triangular matrices by halves down to the written-out kernel (max_stack 0),
    # or a short stack by trtri, one call a matrix (1000: from TRTRI_LOOP_MIN_SIZE rows, 13 and up here); sizes
    # either side of the kernel's UNROLL_MAX_SIZE and odd ones (unequal halves)
    from hierpool.algebra import linalg
    from hierpool.algebra.linalg import UNROLL_MAX_SIZE, tri_inverse

    monkeypatch.setattr(linalg, "TRTRI_LOOP_MAX_STACK", max_stack)
    rng = np.random.default_rng(7)
    for size in (UNROLL_MAX_SIZE, UNROLL_MAX_SIZE + 1, 13, 27, 45):
        a = rng.normal(size=(3, 4, size, size + 3))
        chol = np.linalg.cholesky(a @ np.swapaxes(a, -1, -2) + np.eye(size))
        stacked = tri_inverse(chol)
        assert stacked.shape == chol.shape
        for index in np.ndindex(chol.shape[:-2]):
            np.testing.assert_allclose(stacked[index], scipy.linalg.solve_triangular(chol[index], np.eye(size),
                                                                                     lower=True), rtol=1e-11,
                                       atol=1e-13)
        np.testing.assert_array_equal(np.triu(stacked, 1), 0.0)
        # the upper triangle is not read (trtri's output keeps it: zeroed after)
        np.testing.assert_array_equal(tri_inverse(chol + np.triu(rng.normal(size=chol.shape), 1)), stacked)
        chol[1, 2, size // 2, size // 2] = 0.0  # a zero pivot: that matrix NaN, the others untouched
        broken = tri_inverse(chol)
        assert np.isnan(broken[1, 2]).all()
        np.testing.assert_array_equal(broken[0], stacked[0])
    assert tri_inverse(np.zeros((0, 20, 20))).shape == (0, 20, 20)  # an empty stack
    integers = np.tile(np.tril(np.full((8, 8), 2)) + 2 * np.eye(8, dtype=int), (2, 1, 1))  # not truncated to integers
    np.testing.assert_allclose(tri_inverse(integers)[1], np.linalg.inv(integers[1]), rtol=1e-12, atol=1e-14)


def test_scaling_columns_by_blocks_on_the_host_is_the_dense_block_diagonal_product():
    # scale_columns multiplies column blocks by I_ell (x) T without forming it; the host merges rows and levels
    # into one matmul, checked here against the dense product with leading (batch) axes broadcasting
    from hierpool.algebra.linalg import scale_columns

    rng = np.random.default_rng(8)
    factors = [rng.normal(size=(5, 1, 2, 2)), rng.normal(size=(5, 1, 1, 1)), None]
    blocks = [(4, 2, factors[0]), (3, 1, factors[1]), (2, 2, None)]
    matrix = rng.normal(size=(5, 6, 7, 4 * 2 + 3 + 4))
    for transpose in (False, True):
        scaled = scale_columns(matrix, blocks, transpose=transpose)
        for d, q in np.ndindex(5, 6):
            pieces = [np.kron(np.eye(ell), (f[d, 0].T if transpose else f[d, 0]) if f is not None else np.eye(k))
                      for ell, k, f in blocks]
            np.testing.assert_allclose(scaled[d, q], matrix[d, q] @ scipy.linalg.block_diag(*pieces), rtol=1e-13,
                                       atol=1e-14)


def test_a_saddle_free_step_descends_along_negative_curvature_the_same_on_the_host_and_compiled():
    # at a saddle the step by |H| moves along the negative-curvature direction by its own length, where the
    # Levenberg-Marquardt shift of the indefinite Hessian nearly cancels it; definite Hessians keep Newton's step
    import jax.numpy as jnp

    from hierpool.algebra.search.newton import _next_step

    curvature = np.array([[[4.0, 0.0], [0.0, -1.0]], [[2.0, 0.5], [0.5, 1.0]]])
    gradient = np.array([[1.0, 0.3], [0.4, -0.2]])
    damping = np.zeros(2)
    host, _, definite = _next_step(curvature, gradient, damping, np, saddle_free=True)
    np.testing.assert_array_equal(definite, [False, True])
    np.testing.assert_allclose(host[0], [-0.25, -0.3], rtol=1e-12)  # -|H|^-1 g: both directions descend
    assert gradient[0] @ host[0] < 0
    np.testing.assert_allclose(host[1], -np.linalg.solve(curvature[1], gradient[1]), rtol=1e-10)
    shifted, _, _ = _next_step(curvature, gradient, damping, np)  # the shifted step: half as long along it
    assert abs(shifted[0, 1]) < 0.6 * abs(host[0, 1])
    for d in range(2):
        compiled, _, _ = _next_step(jnp.asarray(curvature[d]), jnp.asarray(gradient[d]), jnp.asarray(0.0), jnp,
                                    saddle_free=True)
        np.testing.assert_allclose(np.asarray(compiled), host[d], rtol=1e-10)


def test_negating_a_column_of_a_relative_factor_leaves_the_model_unchanged():
    # why NLopt may optimize theta unconstrained: canonical_theta maps its optimum back to lme4's
    from hierpool.algebra.linalg import canonical_theta

    model = hp.MixedModel("Reaction ~ Days + (1 + Days + I(Days**2) | Subject) + (1 | Days)", load("sleepstudy"))
    theta = np.array([0.9, 0.1, -0.2, 0.3, 0.05, 0.2, 0.4])
    flipped = theta * np.array([1, 1, 1, -1, -1, 1, -1])  # T_1's second column, and the scalar term
    assert canonical_theta(flipped, (3, 1)) == pytest.approx(theta, abs=0)
    value, gradient = model.objective_and_gradient(flipped)
    assert value == pytest.approx(model.objective(theta), rel=1e-12)
    step = 1e-6 * np.eye(theta.size)
    central = [(model.objective(flipped + h) - model.objective(flipped - h)) / 2e-6 for h in step]
    np.testing.assert_allclose(gradient, central, rtol=1e-5, atol=1e-5 * np.max(np.abs(gradient)))


def _record_nlopt_tries(monkeypatch) -> list:
    """The certified optimum (or None: L-BFGS-B decides) of each NLopt first try, in order."""
    from hierpool.closedform import optimize

    tried = []
    interior_optimum = optimize._interior_optimum
    monkeypatch.setattr(optimize, "_interior_optimum", lambda *args: tried.append(interior_optimum(*args)) or tried[-1])
    return tried


@pytest.mark.parametrize("name,formula,reml,certified", [
    ("sleepstudy", "Reaction ~ Days + (Days | Subject)", False, True),  # ML: the moment start is not the optimum
    ("Penicillin", "diameter ~ 1 + (1 | plate) + (1 | sample)", True, True),
    ("Orthodont", "distance ~ age + (age | Subject)", True, True),
    ("biomarker", "biomarker ~ time + (time | patient)", True, True),  # interior, 0.01 from the bound
    ("sleepstudy", "Reaction ~ Days + (1 | Subject) + (1 | Days)", True, False),  # singular: L-BFGS-B decides
])
def test_small_fits_tried_by_nlopt_end_where_lbfgsb_ends(name, formula, reml, certified, monkeypatch):
    # a small model on the host tries NLopt first and keeps its optimum only when certified interior;
    # L-BFGS-B alone (the path of every other fit) must reach the same optimum
    from hierpool.closedform import optimize

    data = hp.datasets.biomarker() if name == "biomarker" else load(name)
    tried = _record_nlopt_tries(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", hp.ConvergenceWarning)  # the singular fit's
        fit = hp.lmm(formula, data, reml=reml)
        monkeypatch.setattr(optimize, "_interior_optimum", lambda *args: None)
        reference = hp.lmm(formula, data, reml=reml)
    assert len(tried) == 1 and (tried[0] is not None) == certified  # which optimizer decided
    assert fit.objective == pytest.approx(reference.objective, rel=1e-12)
    np.testing.assert_allclose(fit.theta, reference.theta, rtol=1e-6, atol=1e-8)


def test_nlopt_giving_up_leaves_the_fit_to_the_certificate_or_lbfgsb(monkeypatch):
    # near-exact data: Luksan's line search fails in rounding noise and NLopt raises its generic error
    # (not RoundoffLimited); the fit must go on, to the same optimum as L-BFGS-B alone
    from hierpool.closedform import optimize

    rng = np.random.default_rng(3)
    g, x = np.repeat(np.arange(10), 5), rng.normal(size=50)
    data = pd.DataFrame({"y": 3 * rng.normal(size=10)[g] + 3 * rng.normal(size=10)[g] * x + 0.1 * rng.normal(size=50),
                         "x": x, "g": g.astype(str)})
    fit = hp.lmm("y ~ x + (x | g)", data)
    monkeypatch.setattr(optimize, "_interior_optimum", lambda *args: None)
    reference = hp.lmm("y ~ x + (x | g)", data)
    assert fit.converged and fit.objective == pytest.approx(reference.objective, rel=1e-10)
    # lme4's max_iter = 0 (NLopt would read it as no limit) still stops the optimizer at once
    with pytest.warns(hp.ConvergenceWarning, match="stopped before"):
        hp.lmm("y ~ x + (x | g)", data, control=hp.Control(max_iter=0))


def test_nlopt_started_at_negative_diagonals_ends_at_lme4s_theta(monkeypatch):
    # the unconstrained optimizer keeps the start's signs (the criterion is even in them); its optimum is
    # mapped back to non-negative diagonals and certified, not left to L-BFGS-B
    data = load("Penicillin")
    tried = _record_nlopt_tries(monkeypatch)
    fit = hp.lmm("diameter ~ 1 + (1 | plate) + (1 | sample)", data, control=hp.Control(theta_start=(-0.5, -2.0)))
    default = hp.lmm("diameter ~ 1 + (1 | plate) + (1 | sample)", data)
    assert tried[0] is not None and np.all(fit.theta > 0)
    np.testing.assert_allclose(fit.theta, default.theta, rtol=1e-6)


FAR_FORMULA = "Reaction ~ Days + (Days | Subject) + (1 | day)"


@pytest.fixture(scope="module")
def far_from_centred_days():
    """sleepstudy's model on Days, and on Days shifted by 1e7 and as timestamps (1.7e12 s + 86,400 s a day), with a
    crossed term of the days as factor (a rest block beside X)."""
    frame = load("sleepstudy").assign(day=lambda d: d.Days.astype(str))
    frame["Reaction"] += np.random.default_rng(3).normal(scale=20.0, size=10)[frame.Days]  # day's sd away from 0
    formula = FAR_FORMULA
    shifted = {"shift": (frame.assign(Days=frame.Days + 1e7), 1.0),
               "timestamp": (frame.assign(Days=1.7e12 + 86400.0 * frame.Days), 86400.0)}
    return frame, hp.lmm(formula, frame), {name: (hp.lmm(formula, data), data, scale)
                                           for name, (data, scale) in shifted.items()}


@pytest.mark.parametrize("name", ["shift", "timestamp"])
def test_a_fixed_effect_far_from_centred_is_the_centred_models_fit(far_from_centred_days, name):
    """X = [1, Days + 1e7] (or timestamps) spans the centred model's columns: the same fit, REML's criterion moved
    by 2 log |det B| for X = X_centred B.  hp.lmm now conditions X as the batch does (algebra.conditioning): before,
    Days + 1e7 raised NumPy's LinAlgError from the Cholesky factor of X' V^-1 X, and the timestamps ended 1.05
    below the optimum by rounding (a wrong slope, 10.70 for 10.47).  Prediction variances are formed on the
    conditioned columns too: on the user's, x' Cov(beta) x at x ~ 1e7 kept 4 digits."""
    frame, centred, fits = far_from_centred_days
    fit, data, scale = fits[name]
    assert fit.converged
    assert fit.objective == pytest.approx(centred.objective + 2.0 * np.log(scale), rel=1e-12)
    (subject, day), (subject_c, day_c) = fit.term_covariances(), centred.term_covariances()
    assert subject[1, 1] * scale**2 == pytest.approx(subject_c[1, 1], rel=1e-6)  # the slope's variance
    assert day[0, 0] == pytest.approx(day_c[0, 0], rel=1e-6) and day_c[0, 0] > 100.0
    assert fit.fixef["Days"] * scale == pytest.approx(centred.fixef["Days"], rel=1e-9)
    assert fit.fixef_se["Days"] * scale == pytest.approx(centred.fixef_se["Days"], rel=1e-9)
    np.testing.assert_allclose(fit.fitted, centred.fitted, rtol=1e-9)
    kept = (fit.ranef.term == "Days").to_numpy()  # the slopes' (the intercepts' are at Days = 0, a shift apart)
    np.testing.assert_allclose(fit.ranef.condsd[kept] * np.where(fit.ranef.grpvar[kept] == "Subject", scale, 1.0),
                               centred.ranef.condsd[kept], rtol=1e-7)
    days = (fit.ranef.grpvar == "day").to_numpy()
    np.testing.assert_allclose(fit.ranef.condval[days], centred.ranef.condval[days], rtol=1e-6)
    new = data.iloc[::7].assign(Subject=lambda d: np.where(np.arange(len(d)) % 2, d.Subject, "new"))
    for interval in ("confidence", "prediction"):
        for re in (True, False):
            mine = fit.predict(new, interval=interval, re=re)
            theirs = centred.predict(frame.iloc[::7].assign(Subject=new.Subject.to_numpy()), interval=interval, re=re)
            np.testing.assert_allclose(mine.se, theirs.se, rtol=1e-9, err_msg=f"{interval}, re={re}")
    blocks = [group_terms(f, "Subject") for f in (fit, centred)]
    slope_sd = [group_coefficient_sd(f, b)[:, 1] for f, b in zip((fit, centred), blocks)]
    np.testing.assert_allclose(slope_sd[0] * scale, slope_sd[1], rtol=1e-8)
    # a start in the user's parametrization is carried to the conditioned columns (started there, the slope's
    # Newton polish raised NumPy's LinAlgError)
    started = hp.lmm(FAR_FORMULA, data, control=hp.Control(theta_start=tuple(np.asarray(fit.theta) * 1.05)))
    assert started.converged and started.objective == pytest.approx(fit.objective, rel=1e-12)
    with pytest.raises(hp.ArgumentError, match=r"theta_start must be 4 values in a flat sequence, got 4 in shape"):
        hp.lmm(FAR_FORMULA, data, control=hp.Control(theta_start=np.asarray(fit.theta)[None]))  # not flattened


def test_a_gls_fit_with_a_fixed_effect_far_from_centred_is_the_centred_models():
    """corAR1 without random terms (closedform.gls) whitened and factored the user's X: at Days + 1e7 phi and the
    SEs came out 2e-6 to 6e-6 off.  It now runs on X conditioned (algebra.conditioning.condition_fixed)."""
    frame = load("sleepstudy")
    centred = hp.lmm("Reaction ~ Days", frame, correlation=hp.ar1("Subject"))
    fit = hp.lmm("Reaction ~ Days", frame.assign(Days=frame.Days + 1e7), correlation=hp.ar1("Subject"))
    assert fit.objective == pytest.approx(centred.objective, rel=1e-12)
    assert fit.phi == pytest.approx(centred.phi, rel=1e-9)
    assert fit.fixef_se["Days"] == pytest.approx(centred.fixef_se["Days"], rel=1e-9)


def test_an_ar1_fit_with_a_fixed_effect_far_from_centred_is_the_centred_models():
    """The AR(1) fit searched on centred X but solved on the user's columns: with Days + 1e7, 1.74 below the
    optimum and beta's SEs 0.9% off.  It is now solved on the conditioned columns and mapped back."""
    frame = load("sleepstudy")
    centred = hp.lmm("Reaction ~ Days + (1 | Subject)", frame, correlation=hp.ar1("Subject"))
    fit = hp.lmm("Reaction ~ Days + (1 | Subject)", frame.assign(Days=frame.Days + 1e7),
                 correlation=hp.ar1("Subject"))
    assert fit.objective == pytest.approx(centred.objective, rel=1e-12)
    assert fit.phi == pytest.approx(centred.phi, rel=1e-9)
    assert fit.fixef_se["Days"] == pytest.approx(centred.fixef_se["Days"], rel=1e-9)
    np.testing.assert_allclose(fit.predict(interval="prediction").se, centred.predict(interval="prediction").se,
                               rtol=1e-9)


def test_a_models_evaluations_at_a_given_theta_condition_a_far_fixed_effect():
    """hp.MixedModel's objective, objective_and_gradient and at(theta) ran on the user's X' X: with Days + 1e7 the
    REML criterion at the optimum's theta was 6.4 off (and with a slope term the Cholesky factor failed).  They now
    run on X's columns conditioned alone (algebra.conditioning.condition_fixed; theta, the terms' parametrization,
    is the user's), the criterion and beta mapped back."""
    frame = load("sleepstudy")
    formula = "Reaction ~ Days + (1 | Subject)"
    centred = hp.lmm(formula, frame)
    model = hp.MixedModel(formula, frame.assign(Days=frame.Days + 1e7))
    assert model.objective(centred.theta) == pytest.approx(centred.objective, rel=1e-12)
    value, gradient = model.objective_and_gradient(centred.theta)
    assert value == pytest.approx(centred.objective, rel=1e-12) and np.abs(gradient).max() < 1e-6
    at = model.at(centred.theta)
    assert at.objective == pytest.approx(centred.objective, rel=1e-12)
    assert at.fixef["Days"] == pytest.approx(centred.fixef["Days"], rel=1e-9)
    assert at.fixef_se["Days"] == pytest.approx(centred.fixef_se["Days"], rel=1e-9)
    np.testing.assert_allclose(at.predict(interval="prediction").se, centred.predict(interval="prediction").se,
                               rtol=1e-9)


@pytest.mark.parametrize("formula, columns", [("Reaction ~ Days * grp + (1 | Subject)", 2),
                                              ("Reaction ~ 0 + grp + Days + (1 | Subject)", 1)])
def test_a_shifted_covariates_interaction_or_a_factor_without_intercept_is_the_centred_models_fit(formula, columns):
    """Centring each column against the intercept left (Days + c) * grp nearly collinear with grp (cond(X A) 1e7) and
    Days beside 0 + grp far from the levels' columns (1e13): SE(Days) 0.3-9% off, reported converged, in hp.lmm and
    fit_batch.  X A is now orthogonalised too (algebra.conditioning.orthogonalised).  A theta_start keeps X's
    conditioning (it conditions X alone, theta being the user's): it had switched it off (criterion 0.085 low)."""
    frame = load("sleepstudy").assign(grp=lambda d: np.where(d.Subject.astype(int) % 2, "a", "b"))
    scale = 86400.0
    stamps = frame.assign(Days=1.7e12 + scale * frame.Days)
    for reml in (True, False):
        centred = hp.lmm(formula, frame, reml=reml)
        shift = 2.0 * np.log(scale) * columns * reml  # REML: X = X_centred B, log |det B| = columns log scale
        fit = hp.lmm(formula, stamps, reml=reml)
        assert fit.converged
        assert fit.objective == pytest.approx(centred.objective + shift, rel=1e-10)
        assert fit.fixef_se["Days"] * scale == pytest.approx(centred.fixef_se["Days"], rel=1e-8)
        started = hp.lmm(formula, stamps, reml=reml, control=hp.Control(theta_start=tuple(centred.theta)))
        assert started.objective == pytest.approx(centred.objective + shift, rel=1e-10)
        batch = hp.fit_batch(formula, [stamps, frame], reml=reml, progress=False)
        assert batch.objective.iloc[0] == pytest.approx(fit.objective, rel=1e-10)
        assert batch.objective.iloc[1] == pytest.approx(centred.objective, rel=1e-10)


def test_a_large_common_location_costs_no_digits():
    """1e8 + y whose residual from X's fit is 1e-5: the location shift's residual, y - X beta0, was formed as X @ beta0,
    which rounds at the location's size, and the several-term criterion moved by 2.6e-6 of itself (1e10: 2e-5 in the
    forty-eighth session's review); column by column (algebra.system.less_columns) it is y's, shifted exactly."""
    formula = "Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)"
    sleep = hp.datasets.sleepstudy()
    rng = np.random.default_rng(14)
    y = 250.0 + 10.0 * sleep.Days.to_numpy() + rng.normal(0, 1e-5, len(sleep))
    near = hp.lmm(formula, sleep.assign(Reaction=y), reml=False)
    far = hp.lmm(formula, sleep.assign(Reaction=1e8 + y), reml=False)
    shifted = hp.lmm(formula, sleep.assign(Reaction=(1e8 + y) - 1e8), reml=False)
    assert far.objective == pytest.approx(shifted.objective, rel=1e-10)
    assert near.fixef["Days"] == pytest.approx(far.fixef["Days"], rel=1e-6)


def test_a_large_location_beside_a_conditioned_covariate_costs_no_digits():
    """x + 2000 (X conditioned: orthogonalised) with y + 1e12: Q's first column, the intercept's, was constant only
    to rounding row by row, and the location did not cancel against it (the criterion 1.3e-6 off, "converged", in
    hp.lmm and the batch alike; the forty-eighth session's second review).  The frames are exact in float64 (y on a
    1/256 grid, integer x): every fit is the same model."""
    rng = np.random.default_rng(4)
    g = np.repeat(np.arange(30), 10)
    x = np.round(rng.uniform(0, 10, 300))
    y = 5 + 2 * x + rng.normal(0, 2, 30)[g] + rng.normal(0, 1, 300)
    data = pd.DataFrame({"y": np.round(y * 256) / 256, "x": x, "g": g.astype(str)})
    reference = hp.lmm("y ~ x + (1 | g)", data)
    far = data.assign(x=data.x + 2000.0, y=data.y + 1e12)
    single = hp.lmm("y ~ x + (1 | g)", far)
    batch = hp.fit_batch("y ~ x + (1 | g)", [far, far.iloc[1:]], progress=False)
    assert single.objective == pytest.approx(reference.objective, rel=1e-12)
    assert batch.objective.iloc[0] == pytest.approx(reference.objective, rel=1e-12)
    assert single.fixef_se["x"] == pytest.approx(reference.fixef_se["x"], rel=1e-10)
