"""One algebra, written once (issue 16): each shared piece against the paths that use it.

A special case kept for speed (sufficient statistics instead of rows, one theta instead
of a batch) is asserted equal to the general piece here; no test compiles a sampler.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

import hierpool as hp
from hierpool.algebra import marginal as general
from hierpool.algebra import one_term_marginal as one_term
from hierpool.algebra import statistics, term0_entries
from hierpool.algebra.checks import singular_rows
from hierpool.algebra.compiler_options import PROGRAMS_KEPT, ProgramCache
from hierpool.algebra.start import em_theta, moment_theta
from hierpool.algebra.system import build_system, location_shift
from hierpool.closedform.optimize import Control, is_singular
from hierpool.closedform.optimize import moment_start as closed_form_start
from hierpool.spec.arguments import probability_argument, sampler_arguments
from hierpool.spec.design import aliased_columns, aliased_within, build_design

SLEEP = "Reaction ~ Days + (Days | Subject)"


# --- the singular-fit rule: hp.fit_batch's vectorized check is the closed form's is_singular ---

@pytest.mark.parametrize("ks", [(1,), (2,), (3,), (2, 1, 3)])
def test_singular_rows_is_the_closed_forms_is_singular(ks):
    rng = np.random.default_rng(1)
    size = sum(k * (k + 1) // 2 for k in ks)
    # values around the tolerance, zeros and negative off-diagonals
    thetas = rng.choice([0.0, 5e-5, 1e-4, 2e-4, 0.3, -0.4, 1.2], size=(200, size))
    for tol in (Control.singular_tol, 1e-2):
        rows = singular_rows(thetas, ks, tol)
        assert rows.shape == (200,)
        assert rows.tolist() == [is_singular(theta, ks, tol) for theta in thetas]
        assert bool(singular_rows(thetas[0], ks, tol)) == is_singular(thetas[0], ks, tol)
    assert not singular_rows(np.full((1, size), np.nan), ks, 1e-4)[0]  # a dataset without a fit


# --- the moment start: the closed form's ANOVA start and fit_batch's start are one function ---

def anova_theta(counts, sums, residual_ss, n, p=0, floor=1e-4):
    """One-way ANOVA by hand: sqrt of (var(level means) - s_w^2 mean(1/n_l)) / s_w^2, clipped."""
    counts, sums = np.asarray(counts, dtype=float), np.asarray(sums, dtype=float)
    within = (residual_ss - np.sum(sums**2 / counts)) / (n - p - len(counts))
    between = np.var(sums / counts, ddof=1) - within * np.mean(1.0 / counts)
    return float(np.sqrt(np.clip(between / within, floor, 1e4)))


@pytest.mark.parametrize("formula, data", [
    ("Reaction ~ Days + (1 | Subject)", "sleepstudy"),
    ("Reaction ~ 1 + (1 | Subject) + (0 + Days | Subject)", "sleepstudy"),
    ("diameter ~ 1 + (1 | plate) + (1 | sample)", "penicillin"),
    ("Yield ~ 1 + (1 | Batch)", "dyestuff"),
])
def test_the_closed_forms_start_of_a_random_intercept_is_one_way_anova(formula, data):
    design = build_design(formula, getattr(hp.datasets, data)())
    expected = closed_form_start(design)
    residual = location_shift(design)[1]
    offset = 0
    for term in design.terms:
        if term.coef_names == ("Intercept",):
            counts = np.bincount(term.index, minlength=term.n_levels)
            sums = np.bincount(term.index, weights=residual, minlength=term.n_levels)
            theta = anova_theta(counts, sums, float(residual @ residual), design.n)  # p=0, floor=1e-4
            assert theta == pytest.approx(expected[offset], rel=1e-10)
        offset += term.k * (term.k + 1) // 2


def test_batch_moment_start_is_the_per_dataset_anova_start():
    # fit_batch's start of a random intercept, from the statistics, against the ANOVA start of each
    # dataset's own rows (its OLS residuals summed per level; fit_batch's floor 1e-2 and p)
    from hierpool.algebra.search.newton import MOMENT_FLOOR, moment_start
    from hierpool.batch.plan import plan_batch

    formula = "Reaction ~ Days + (1 | Subject)"
    data = hp.datasets.sleepstudy_replicates(6, seed=2)
    data = data[~((data.dataset == 0) & (data.Days > 5))]  # unequal level sizes
    plan = plan_batch(formula, data, "dataset", "test", "hp.lmm")
    (_, members, stats), = plan.buckets()[0]
    start = moment_start(stats)
    for row, index in enumerate(members):
        design = build_design(formula, plan.dataset_frame(index)[0])
        beta = np.linalg.lstsq(design.X, design.y, rcond=None)[0]
        residual = design.y - design.X @ beta
        term = design.terms[0]
        theta = anova_theta(np.bincount(term.index), np.bincount(term.index, weights=residual),
                            float(residual @ residual), design.n, p=design.p, floor=MOMENT_FLOOR)
        assert start[row, 0] == pytest.approx(theta, rel=1e-9)


def test_moment_start_of_a_shared_design_equals_the_general_path():
    """A shared design's statistics repeat its blocks by a zero stride (kept so by take): moment_theta computes their
    per-level inverses once, equal to the start of the same statistics copied dataset by dataset; a level with one
    row of a slope term (not usable) included."""
    from hierpool.algebra.search.newton import moment_start
    from hierpool.algebra.statistics import shared_design_statistics

    rng = np.random.default_rng(5)
    level = np.r_[np.repeat(np.arange(7), 4), 7]  # level 7: one row
    x = rng.normal(size=level.size)
    X = np.c_[np.ones(level.size), x]
    stats = shared_design_statistics(level, X, X.copy(), rng.normal(size=(level.size, 9)), 8).take(np.arange(1, 8))
    assert stats.ztz.strides[0] == 0 and stats.n.strides[0] == 0 and stats.ztz.shape[0] == 7
    copied = stats.map_arrays(np.array)
    assert copied.ztz.strides[0] != 0
    np.testing.assert_allclose(moment_start(stats), moment_start(copied), rtol=1e-13, atol=1e-14)  # (sums in their order)
    assert not np.all(moment_start(stats) == moment_start(stats)[0])  # (the responses' own starts)


def test_moment_theta_falls_back_to_the_identity():
    # one usable level of a scalar term, and a dataset whose residuals are all zero
    ztz = np.zeros((2, 3, 1, 1))
    ztz[0, 0] = 4.0
    ztz[1] = 5.0
    cross = np.zeros((2, 3, 1))
    theta = moment_theta(ztz, cross, np.array([1.0, 0.0]), np.array([4.0, 15.0]), p=1, floor=1e-2)
    np.testing.assert_array_equal(theta, [[1.0], [1.0]])
    one_level = moment_theta(np.full((1, 1, 1, 1), 5.0), np.full((1, 1, 1), 3.0), np.array([2.0]), np.array([5.0]),
                             p=0, floor=1e-4)
    assert one_level[0, 0] == 1.0  # one level: lme4's start


def test_moment_theta_floors_a_share_of_variance_whatever_the_units():
    """A slope's column in other units (days as weeks: z / 7) gives the same start in those units (theta's rows scaled
    by 7), also where the floor binds: the floor is on Sigma in Z's columns scaled to unit root-mean-square."""
    rng = np.random.default_rng(5)
    ell, rows = 12, 10
    x = np.tile(np.arange(rows, dtype=float), ell)
    level = np.repeat(np.arange(ell), rows)
    for slope_sd in (0.5, 1e-3):  # the floor does not bind, then binds
        r = rng.normal(size=ell)[level] + slope_sd * rng.normal(size=ell)[level] * x + rng.normal(size=len(x))
        starts = []
        for scale in (1.0, 1.0 / 7.0):
            z = np.column_stack([np.ones(len(x)), x * scale])
            ztz = np.stack([z[level == g].T @ z[level == g] for g in range(ell)])[None]
            cross = np.stack([z[level == g].T @ r[level == g] for g in range(ell)])[None]
            starts.append(moment_theta(ztz, cross, np.array([r @ r]), np.array([len(x) * 1.0]), p=0, floor=1e-2)[0])
        lam = [np.array([[t[0], 0.0], [t[1], t[2]]]) for t in starts]
        np.testing.assert_allclose(np.diag([1.0, 7.0]) @ lam[0], lam[1], rtol=1e-10, atol=1e-14)
    # where it binds, the slope's share of an observation's variance is the floor's, not 1e-2 per unit of x squared
    rms = np.sqrt(np.mean(x**2))
    sigma = lam[0] @ lam[0].T
    assert np.linalg.eigvalsh(sigma * np.outer([1.0, rms], [1.0, rms])).min() == pytest.approx(1e-2, rel=1e-8)


def test_em_theta_is_the_cholesky_factor_of_the_mean_second_moment():
    rng = np.random.default_rng(3)
    b2, b1 = rng.normal(size=(40, 2)), rng.normal(size=(7, 1))
    v2 = np.einsum("lij,lkj->lik", *(2 * [0.1 * rng.normal(size=(40, 2, 2))]))
    v1 = np.full((7, 1, 1), 0.25)
    sigma2 = (b2.T @ b2 + v2.sum(axis=0)) / 40
    chol = np.linalg.cholesky(sigma2)
    theta = em_theta([b2, b1], [v2, v1], floor=1e-2)
    # lme4's order: the lower triangle column by column, then the next term
    np.testing.assert_allclose(theta, [chol[0, 0], chol[1, 0], chol[1, 1], np.sqrt(np.mean(b1**2) + 0.25)],
                               rtol=1e-12)
    # a term whose effects and variances vanish starts at the floor, not at theta's boundary
    assert em_theta([np.zeros((5, 1))], [np.zeros((5, 1, 1))], floor=1e-2) == pytest.approx([0.1])


# --- one compiled-program cache policy ---

def test_program_cache_is_a_small_lru():
    cache = ProgramCache(2)
    built = []

    def build(value):
        return lambda: built.append(value) or value

    assert cache.get("a", build("A")) == "A"
    assert cache.get("a", build("other")) == "A"  # a hit does not build
    cache.get("b", build("B"))
    cache.get("a", build("other"))  # "a" is now the most recently used
    cache.get("c", build("C"))  # drops "b", the least recently used
    assert built == ["A", "B", "C"]
    assert "a" in cache and "c" in cache and "b" not in cache and len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        ProgramCache(0)


def test_every_compiled_program_cache_shares_the_policy():
    from hierpool.batch import bayes as batch_bayes
    from hierpool.batch import fit as batch_fit
    from hierpool.bayesian import nuts

    for cache in (nuts._PROGRAMS, batch_fit._COMPILED, batch_bayes._PROGRAMS):
        assert isinstance(cache, ProgramCache) and cache.size == PROGRAMS_KEPT


# --- the collapsed likelihood: one formula, the one-term path on statistics equal to the general one ---

def test_prior_pseudo_observations_are_the_same_in_both_engines(sleepstudy):
    design = build_design(SLEEP, sleepstudy)
    system = build_system(design)
    stats = statistics.one_dataset_statistics(design)
    loc, scale, sigma = jnp.asarray([250.0, 9.0]), jnp.asarray([40.0, jnp.inf]), jnp.asarray(20.0)
    block = general.beta_prior_block(loc, scale, sigma, system)
    prior = one_term.with_beta_prior(stats, loc, scale, sigma)
    q, p = system.layout.q_rest, design.p
    np.testing.assert_array_equal(np.asarray(prior.xtx - stats.xtx), np.asarray(block[q:q + p, q:q + p]))
    np.testing.assert_array_equal(np.asarray(prior.xty - stats.xty), np.asarray(block[q:q + p, -1]))
    assert float(prior.yty) == pytest.approx(float(stats.yty + block[-1, -1]), rel=1e-15)


def test_one_term_marginal_likelihood_on_the_host_equals_the_general_engine(sleepstudy):
    # NumPy in (the one-term algebra's host path), the general engine in JAX: the same number to 1e-11
    design = build_design(SLEEP, sleepstudy)
    system = build_system(design)
    stats = statistics.one_dataset_statistics(design)
    loc, scale = np.array([250.0, 9.0]), np.array([40.0, np.inf])
    rng = np.random.default_rng(3)
    general_at = jax.jit(general.log_marginal_likelihood)  # one program, not every operation dispatched on its own
    for _ in range(3):
        theta, sigma = rng.uniform(0.05, 1.5, size=3), float(rng.uniform(10, 40))
        host = one_term.log_marginal_likelihood(theta, np.float64(sigma), stats, loc, scale)
        reference = general_at(jnp.asarray(theta), jnp.asarray(sigma), system, jnp.asarray(loc), jnp.asarray(scale))
        assert isinstance(host, (np.ndarray, np.generic))
        assert float(host) == pytest.approx(float(reference), rel=1e-11)


# --- argument checks: one rule, one message, in hp.bayes and hp.bayes_batch ---

def test_sampler_arguments():
    assert sampler_arguments(np.int64(2), 10, 0, 3, 0.9, 0.8) == (2, 10, 0, 3)
    with pytest.raises(hp.ArgumentError, match="draws must be an integer >= 4, got 3"):
        sampler_arguments(2, 3, 1, 0, 0.9, 0.8)  # (every sampler: spec.arguments.MIN_DRAWS)
    with pytest.raises(hp.ArgumentError, match="tune must be an integer >= 1, got 0"):
        sampler_arguments(2, 10, 0, 0, 0.9, 0.8, min_tune=1)
    with pytest.raises(hp.ArgumentError, match="seed must be an integer >= 0"):
        sampler_arguments(2, 10, 0, -1, 0.9, 0.8)
    assert probability_argument("level", 0.5) == 0.5


@pytest.mark.parametrize("bad, message", [
    ({"chains": 0}, "chains must be an integer >= 1, got 0"),
    ({"seed": 1.5}, "seed must be an integer >= 0, got 1.5"),
    ({"level": 1.0}, "level must be between 0 and 1, got 1.0"),
    ({"target_accept": 0}, "target_accept must be between 0 and 1, got 0"),
])
def test_bayes_and_bayes_batch_refuse_the_same_arguments_alike(sleepstudy, bad, message):
    with pytest.raises(hp.ArgumentError) as single:
        hp.bayes(SLEEP, sleepstudy, **bad)
    with pytest.raises(hp.ArgumentError) as batch:
        hp.bayes_batch(SLEEP, sleepstudy.assign(dataset=0), **bad)
    assert str(single.value) == str(batch.value) == message


def test_interval_levels_are_checked_alike_in_predict_and_pooling(sleepstudy):
    fit = hp.lmm("Reaction ~ Days + (1 | Subject)", sleepstudy)
    with pytest.raises(hp.ArgumentError) as predict:
        fit.predict(sleepstudy.iloc[:2], interval="prediction", level=1.5)
    with pytest.raises(hp.ArgumentError) as pooling:
        hp.pooling("Reaction ~ Days + (1 | Subject)", sleepstudy, level=1.5, bayes=False)
    assert str(predict.value) == str(pooling.value) == "level must be between 0 and 1, got 1.5"


def test_grouped_products_of_a_block_with_itself_are_its_general_products_mirrored():
    from hierpool.algebra.system import grouped_products

    rng = np.random.default_rng(5)
    keys, z, w = rng.integers(0, 7, 200), rng.normal(size=(200, 3)), rng.uniform(0.5, 2.0, 200)
    symmetric = grouped_products(keys, z, z, w, 7)  # the same array: the upper triangle summed, then mirrored
    general = grouped_products(keys, z, z.copy(), w, 7)
    np.testing.assert_allclose(symmetric, general, rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(symmetric, np.swapaxes(symmetric, -1, -2))
    np.testing.assert_allclose(symmetric[2], (z[keys == 2] * w[keys == 2, None]).T @ z[keys == 2], rtol=1e-12)


def test_dataset_cells_is_the_two_axis_index_of_a_batch_s_blocks():
    from hierpool.algebra.linalg import dataset_cells

    rng = np.random.default_rng(4)
    blocks = rng.normal(size=(5, 7, 2, 3))
    dataset, level = rng.integers(0, 5, 40).astype(np.int32), rng.integers(0, 7, 40).astype(np.int32)
    np.testing.assert_array_equal(dataset_cells(blocks, dataset, level), blocks[dataset, level])
    transposed = np.swapaxes(rng.normal(size=(7, 5, 2)), 0, 1)  # not contiguous
    np.testing.assert_array_equal(dataset_cells(transposed, dataset, level), transposed[dataset, level])


def test_term0_factor_s_matrix_products_and_its_paired_einsum_agree():
    # the host forms T0^T A00_l T0 by matrix products up to MATMUL_MAX_BLOCKS blocks and by the paired einsum past
    # them: a stack on either side of the bound, and its halves, give the same factors
    from hierpool.algebra.criterion import MATMUL_MAX_BLOCKS, term0_factor

    rng = np.random.default_rng(6)
    for k in (1, 2, 3):
        t0 = np.tril(rng.normal(size=(2, k, k)))
        a = rng.normal(size=(2, MATMUL_MAX_BLOCKS // 2 + 1, k, 4))
        a00 = a @ np.swapaxes(a, -1, -2)  # 2 x 513 blocks: the einsum
        whole = term0_factor(t0, a00)
        halves = [term0_factor(t0[i], a00[i]) for i in range(2)]  # 513 each: the matrix products
        for j in range(2):
            np.testing.assert_allclose(np.stack([h[j] for h in halves]), whole[j], rtol=1e-12, atol=1e-14)
        chol, _ = halves[0]
        expected = np.swapaxes(t0[0], -1, -2) @ a00[0] @ t0[0] + np.eye(k)
        np.testing.assert_allclose(chol @ np.swapaxes(chol, -1, -2), expected, rtol=1e-12, atol=1e-12 * expected.max())


WRITTEN_OUT_K0 = term0_entries.MAX_K0  # the widest term 0 written out, each width up to it tested


def _term0_both_ways(monkeypatch, t0, a00, grad_m):
    """Term 0's value, M_l, P_l, adjoint (lower triangle: all theta reads) and factors, written out entry by entry
    and by the stacked forms."""
    from hierpool.algebra import criterion, term0_entries

    results = {}
    for written_out in (True, False):
        monkeypatch.setattr(term0_entries, "MAX_K0", WRITTEN_OUT_K0 if written_out else 0)
        assert term0_entries.applies(t0, a00) == written_out
        (logdet, m_levels), (_, _, p_levels) = criterion._term0_values(t0, a00)
        adjoint = np.tril(criterion._term0_adjoint(a00, m_levels, p_levels, 0.7, grad_m))
        value = criterion._term0_value(t0, a00)
        results[written_out] = (logdet, m_levels, p_levels, adjoint, *value, *criterion._term0_forward(t0, a00))
    return results[True], results[False]


@pytest.mark.parametrize("k", range(2, WRITTEN_OUT_K0 + 1))
def test_term0_written_out_entry_by_entry_is_the_stacked_forms(k, monkeypatch):
    # term 0's factor, M_l, P_l and the adjoint on the host, entry by entry (small blocks), against the stacked
    # matrix forms: on a batch's axes (datasets, points against datasets, 1), on one system, at complex points (the
    # complex step in theta, and in the systems: the AR(1) search's), and with a block that is not positive definite
    rng = np.random.default_rng(8)
    t0 = np.tril(rng.normal(size=(3, 4, k, k)))
    a = rng.normal(size=(3, 1, 7, k, k + 2))
    a00 = a @ np.swapaxes(a, -1, -2)
    grad_m = rng.normal(size=(3, 4, 7, k, k))
    cases = [(t0, a00, grad_m), (t0[0, 0], a00[0, 0], grad_m[0, 0]),
             (t0 + 1e-30j * np.tril(rng.normal(size=t0.shape)), a00, grad_m),
             (t0, a00 + 1e-30j * a00[:, :, ::-1], grad_m)]
    for t, a_, g in cases:
        entries, stacked = _term0_both_ways(monkeypatch, t, a_, g)
        for x, y in zip(entries, stacked):
            assert x.shape == y.shape and x.dtype == y.dtype
            np.testing.assert_allclose(x.real, y.real, rtol=1e-11, atol=1e-13)
            np.testing.assert_allclose(x.imag, y.imag, rtol=1e-9, atol=1e-45)
    # the factor is the factor of T0^T A00_l T0 + I
    chol = _term0_both_ways(monkeypatch, t0, a00, grad_m)[0][8]  # the forward's L_l
    expected = np.swapaxes(t0, -1, -2)[:, :, None] @ a00 @ t0[:, :, None] + np.eye(k)
    np.testing.assert_allclose(chol @ np.swapaxes(chol, -1, -2), expected, rtol=1e-12)
    # a level of dataset 1 whose block is not positive definite: NaN for that dataset's criterion only, no warning
    indefinite = a00.copy()
    indefinite[1, 0, 2] = -np.eye(k) * 1e3
    from hierpool.algebra import criterion, term0_entries

    monkeypatch.setattr(term0_entries, "MAX_K0", WRITTEN_OUT_K0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (logdet, m_levels), _ = criterion._term0_values(t0, indefinite)
    assert np.isnan(logdet[1]).all() and np.isfinite(logdet[[0, 2]]).all()
    assert np.isnan(m_levels[1, :, 2]).all() and np.isfinite(np.delete(m_levels[1], 2, axis=1)).all()
    # the stacked forms' per-matrix fallback: NaN at the same places, the same numbers elsewhere
    monkeypatch.setattr(term0_entries, "MAX_K0", 0)
    with np.errstate(all="ignore"):
        (stacked_logdet, stacked_m), _ = criterion._term0_values(t0, indefinite)
    np.testing.assert_array_equal(np.isnan(stacked_logdet), np.isnan(logdet))
    np.testing.assert_allclose(stacked_m, m_levels, rtol=1e-11, atol=1e-13)  # NaN where the other is NaN


def test_block_product_is_matmul_with_one_column_blocks_taken_elementwise():
    from hierpool.algebra.linalg import block_product

    rng = np.random.default_rng(2)
    for inner in (1, 2):  # against an independent sum over the inner index (einsum), not matmul itself
        a, b = rng.normal(size=(4, 30, 3, inner)), rng.normal(size=(4, 1, inner, 5))
        np.testing.assert_allclose(block_product(a, b), np.einsum("...ij,...jk->...ik", a, b), rtol=1e-14)
    # a coupling by its term's factor (one per dataset, broadcast over cells), one-column blocks throughout
    block, factor = rng.normal(size=(4, 30, 1, 1)), rng.normal(size=(4, 1, 1))
    np.testing.assert_array_equal(block_product(block, factor[..., None, :, :]), block @ factor[..., None, :, :])
    # stacks of matrix-vector products (k = 1 or i = 1) with a narrow inner width, large (the elementwise sum) and
    # small (matmul), the other operand broadcast over cells
    for inner in (2, 3, 4, 5):
        for cells in (3, 300):
            for a, b in ((rng.normal(size=(4, cells, 2, inner)), rng.normal(size=(4, cells, inner, 1))),
                         (rng.normal(size=(4, cells, 1, inner)), rng.normal(size=(4, 1, inner, 3))),
                         (rng.normal(size=(4, 1, 3, inner)), rng.normal(size=(4, cells, inner, 1)))):
                np.testing.assert_allclose(block_product(a, b), np.einsum("...ij,...jk->...ik", a, b), rtol=1e-13,
                                           atol=1e-13)
    with pytest.raises(ValueError):  # an inner size that does not match is refused, as by matmul
        block_product(rng.normal(size=(3, 1)), rng.normal(size=(3, 5)))
    with pytest.raises(ValueError):
        block_product(rng.normal(size=(400, 2, 3)), rng.normal(size=(400, 2, 1)))


def test_rank_reduced_theta_drops_the_smallest_eigenvalue_s_part_of_each_vector_term():
    from hierpool.algebra.linalg import rank_reduced_theta, theta_to_factors

    rng = np.random.default_rng(3)
    ks = (1, 2, 3)
    theta = rng.normal(size=(5, 1 + 3 + 6))
    theta[2, 4:] = np.nan  # one dataset's third term not finite: NaN there alone
    reduced = rank_reduced_theta(theta, ks)
    np.testing.assert_array_equal(reduced[:, 0], theta[:, 0])  # a one-coefficient term is unchanged
    for j, (before, after) in enumerate(zip(theta_to_factors(theta, ks)[1:], theta_to_factors(reduced, ks)[1:])):
        for d in range(5):
            if j == 1 and d == 2:
                assert np.isnan(after[d][np.tril_indices(3)]).all()
                continue
            values, vectors = np.linalg.eigh(before[d] @ before[d].T)
            expected = before[d] @ before[d].T - values[0] * np.outer(vectors[:, 0], vectors[:, 0])
            np.testing.assert_allclose(after[d] @ after[d].T, expected, atol=1e-10 * values[-1])
            # the last diagonal at the boundary, to rounding (a Schur complement of ~eps: its root ~1e-8 relative,
            # larger for an ill-conditioned rest); not exactly 0, where the criterion's slope in it would be 0 too
            assert abs(after[d][-1, -1]) < 1e-4 * np.sqrt(values[-1])


def test_the_batchs_snap_onto_the_boundary_reads_the_users_theta_with_prior_weights():
    """A linear model's prior weights put the batch's searched theta over their unit (batch.conditioning); lme4's
    rule and hp.lmm's snap read the user's theta, so the snap's tolerance is over the unit there (per dataset);
    with known sds it stays the searches' own (lme4's rule relative to the sds, in both engines)."""
    from hierpool.algebra.checks import SINGULAR_TOL, onto_boundary
    from hierpool.algebra.search.terms import boundary_tolerance

    n = np.array([40.0, 40.0, 40.0])
    log_weights = np.log(np.array([1.0, 1e-6, 1e6])) * n  # units 1, 1e3, 1e-3
    np.testing.assert_allclose(boundary_tolerance(log_weights, n, False), SINGULAR_TOL * np.array([1.0, 1e-3, 1e3]))
    assert boundary_tolerance(log_weights, n, True) == SINGULAR_TOL
    theta = np.array([[5e-7, 0.3], [5e-7, 0.3], [5e-7, 0.3]])  # (1 | g) + (1 | h): the first variance near 0
    tol = boundary_tolerance(log_weights, n, False)
    snapped, _ = onto_boundary(theta, np.zeros(3), lambda points, rows: np.zeros(len(rows)), (1, 1), tol)
    np.testing.assert_array_equal(snapped[:, 0], [0.0, 5e-7, 0.0])  # 5e-7 times the unit 1e3: 5e-4 of the user's
    np.testing.assert_array_equal(snapped[:, 1], 0.3)


def test_boundary_axis_points_read_each_element_at_zero_along_itself_in_its_units():
    from hierpool.algebra.linalg import BOUNDARY_AXIS_SCAN, boundary_axis_points

    ks = (2, 1)
    assert boundary_axis_points(np.array([0.5, 0.2, 0.4, 0.7]), ks, 1e-4) == []
    theta = np.array([5e-5, 0.3, 0.2, 0.0])  # T_11 within at_most of 0, the scalar term at 0 (T_21 has no bound)
    scales = np.array([2.0, 1.0, 1.0, 0.1])
    first, second = boundary_axis_points(theta, ks, 1e-4, scales)
    np.testing.assert_array_equal(first[:, 0], BOUNDARY_AXIS_SCAN * 2.0)
    np.testing.assert_array_equal(second[:, 3], BOUNDARY_AXIS_SCAN * 0.1)
    np.testing.assert_array_equal(first[:, 1:], np.broadcast_to(theta[1:], (BOUNDARY_AXIS_SCAN.size, 3)))
    np.testing.assert_array_equal(second[:, :3], np.broadcast_to(theta[:3], (BOUNDARY_AXIS_SCAN.size, 3)))
    assert BOUNDARY_AXIS_SCAN[0] == pytest.approx(1e-3) and BOUNDARY_AXIS_SCAN[-1] == pytest.approx(1.0)


def test_other_face_starts_move_the_terms_off_the_boundary_onto_it_and_those_on_it_inside():
    from hierpool.algebra.linalg import (
        BOUNDARY_PROBE_VALUES,
        boundary_probes,
        other_face_starts,
        other_minimum_starts,
        rank_reduced_theta,
    )

    # two scalar terms, one at 0: the other face, at each probe value and at the moved term's size, in each
    # element's own units
    theta, units = np.array([0.3, 0.0]), np.array([1.0, 2.0])
    faces = other_face_starts(theta, (1, 1), 1e-4, units)
    np.testing.assert_array_equal(faces, [[0.0, 2.0 * value] for value in (*BOUNDARY_PROBE_VALUES, 0.3)])
    # a boundary optimum's other minima: its probes, then the other face (hp.fit_batch's searches from both)
    starts = other_minimum_starts(theta, (1, 1), 1e-4, units)
    assert len(starts) == len(boundary_probes(theta, (1, 1), 1e-4, units)) + 3
    np.testing.assert_array_equal(starts[-3:], faces)
    # a vector term off the boundary is rank-reduced, the scalar at 0 set to its largest diagonal's share last
    theta = np.array([0.5, 0.2, 0.4, 0.0])
    faces = other_face_starts(theta, (2, 1), 1e-4)
    assert len(faces) == 3
    np.testing.assert_array_equal(faces[-1][:3], rank_reduced_theta(theta, (2, 1), terms=(0,))[:3])
    assert faces[-1][3] == 0.5
    # none where no term is at 0, or none is off it
    assert other_face_starts(np.array([0.3, 0.2]), (1, 1), 1e-4) == []
    assert other_face_starts(np.array([0.0, 5e-5]), (1, 1), 1e-4) == []


def test_other_minimum_starts_probe_inside_a_boundary_optimum_and_move_an_inner_one_onto_the_boundary():
    from hierpool.algebra.linalg import (
        BOUNDARY_PROBE_VALUES,
        boundary_probes,
        other_minimum_starts,
        rank_reduced_theta,
    )

    ks = (2, 1)
    inner = np.array([0.5, 0.2, 0.4, 0.7])
    assert boundary_probes(inner, ks, 1e-4) == []
    starts = other_minimum_starts(inner, ks, 1e-4)
    assert len(starts) == 2  # each term alone onto its boundary, the other as it was
    np.testing.assert_array_equal(starts[0], rank_reduced_theta(inner, ks, terms=(0,)))
    np.testing.assert_array_equal(starts[0][3], 0.7)
    np.testing.assert_array_equal(starts[1], [0.5, 0.2, 0.4, 0.0])
    # a boundary optimum (T_22 of the vector term within at_most of 0, the scalar at 0): each such diagonal element
    # moved to each probe value; no full-rank probe, as only the vector term's last diagonal is at 0
    boundary = np.array([0.5, 0.2, 5e-5, 0.0])
    probes = other_minimum_starts(boundary, ks, 1e-4)
    np.testing.assert_array_equal(probes, boundary_probes(boundary, ks, 1e-4))
    expected = [np.where(np.arange(4) == j, value, boundary) for j in (2, 3) for value in BOUNDARY_PROBE_VALUES]
    np.testing.assert_array_equal(probes, expected)
    # the intercept's variance at 0: the vector term's covariance made full rank too (full_rank_probes), and those of
    # correlation +-0.9 rank-reduced: on the faces of correlation +-1, T_22 at 0 to rounding
    face = np.array([0.0, 0.3, 0.2, 0.7])
    probes = boundary_probes(face, ks, 1e-4)
    assert len(probes) == 2 + 3 + 2
    for probe, sign in zip((probes[4], probes[6]), (1.0, -1.0)):  # (after the full-rank probes of 0.9 and -0.9)
        assert probe[0] > 0.0 and np.sign(probe[1]) == sign and abs(probe[2]) < 1e-6 * abs(probe[1])
        assert probe[3] == 0.7
    # ...in theta's units: weights times c move theta and its units by 1 / sqrt(c), and every probe with them (with
    # the full-rank probes' floor in theta's own units, weights of ~1e6 put one at 70 units: the fifty-fifth session)
    units = np.array([1.0, 0.2, 0.2, 1.0])
    for c in (1e-6, 1.0, 1e4):
        moved = boundary_probes(face / np.sqrt(c), ks, 1e-4 / np.sqrt(c), scales=units / np.sqrt(c))
        np.testing.assert_allclose(np.array(moved) * np.sqrt(c), boundary_probes(face, ks, 1e-4, scales=units),
                                   rtol=1e-12, atol=1e-9)  # (T_22 of a rank-reduced probe: rounding)
    # the probes in the columns' units (theta_scales: a slope's theta is smaller by its covariate's rms)
    scaled = boundary_probes(boundary, ks, 1e-4, scales=np.array([1.0, 1.0, 0.1, 2.0]))
    np.testing.assert_array_equal(scaled[0], [0.5, 0.2, BOUNDARY_PROBE_VALUES[0] * 0.1, 0.0])
    np.testing.assert_array_equal(scaled[2], [0.5, 0.2, 5e-5, BOUNDARY_PROBE_VALUES[0] * 2.0])


def test_weights_uneven_reads_each_group_s_largest_over_smallest_weight():
    from hierpool.algebra.linalg import UNEVEN_WEIGHTS_RATIO, weights_uneven

    weights = np.array([1.0, 2.0, 0.5, 1.0, 99.0, 1.0, UNEVEN_WEIGHTS_RATIO * 0.1])
    groups = np.array([0, 0, 1, 1, 1, 2, 2])
    np.testing.assert_array_equal(weights_uneven(weights, groups, 3), [False, True, False])
    np.testing.assert_array_equal(weights_uneven(weights[2:5]), [True])  # 99 / 0.5 (one group)
    np.testing.assert_array_equal(weights_uneven([1.0, UNEVEN_WEIGHTS_RATIO]), [True])  # the ratio itself counts


def test_glm_start_fits_each_dataset_s_glm_and_keeps_its_linear_predictor():
    """Datasets leave glm_start's IRLS once converged, a separated one runs on: each converged dataset's beta
    solves its own score equations, and every row's eta is offset + X beta of its dataset's beta."""
    from hierpool.algebra.family import family as make_family
    from hierpool.algebra.glm import glm_irls
    from hierpool.batch.fit_glmm import glm_start
    from hierpool.batch.plan import plan_batch
    from hierpool.spec.family import family_spec

    rng = np.random.default_rng(4)
    frames = []
    for d in range(6):
        x = rng.normal(size=40)
        y = rng.binomial(1, 1 / (1 + np.exp(-(0.3 * d - 0.5 + x))))
        if d == 3:
            y = (x > 0).astype(int)  # complete separation: beta runs off
        frames.append(pd.DataFrame({"x": x, "y": y, "g": np.repeat(np.arange(8), 5).astype(str)}))
    spec = family_spec("binomial", None)
    plan = plan_batch("y ~ x + (1 | g)", frames, "rep", "fit_batch", "hp.glmm", one_term=False, family=spec)
    design = plan.design
    beta, eta = glm_start(plan, make_family(spec))
    np.testing.assert_allclose(eta, design.offset + np.einsum("np,np->n", design.X, beta[plan.dataset]),
                               rtol=1e-13, atol=1e-13)
    mu = 1 / (1 + np.exp(-eta))
    for d in (0, 1, 2, 4, 5):
        rows = plan.dataset == d
        score = design.X[rows].T @ (design.y[rows] - mu[rows])
        assert np.max(np.abs(score)) < 1e-8, d
        # the batched specialisation of the one IRLS (algebra.glm): each dataset's GLM as glm_irls fits it alone
        alone, settled = glm_irls(design.X[rows], design.y[rows], design.row_weights[rows], design.offset[rows],
                                  make_family(spec))
        assert settled
        np.testing.assert_allclose(beta[d], alone, rtol=1e-9, atol=1e-12)
    assert np.max(np.abs(beta[3])) > 10  # the separated dataset ran off, without holding the others


@pytest.mark.parametrize("family_name", ["binomial", "poisson"])
def test_glmm_restart_is_irls_first_step(family_name):
    """hp.glmm's restart (glm.fit's first step, working_start) is the one IRLS's first step, offsets and
    prior weights included; run to the end, that IRLS solves the GLM's score equations."""
    from hierpool.algebra.family import family as make_family
    from hierpool.algebra.glm import glm_irls
    from hierpool.closedform.glmm_optimize import working_start
    from hierpool.spec.family import family_spec

    rng = np.random.default_rng(11)
    n = 60
    frame = pd.DataFrame({"x": rng.normal(size=n), "g": np.repeat(list("abcdef"), 10),
                          "t": rng.integers(1, 6, size=n), "e": rng.uniform(0.5, 2.0, size=n)})
    if family_name == "binomial":
        frame["y"] = rng.binomial(frame["t"], 1 / (1 + np.exp(-0.5 - frame["x"]))) / frame["t"]
        spec, formula, extra = family_spec("binomial", None), "y ~ x + (1 | g)", {"weights": "t"}
    else:
        frame["y"] = rng.poisson(frame["e"] * np.exp(0.2 + 0.7 * frame["x"]))
        spec, formula, extra = family_spec("poisson", None), "y ~ x + offset(np.log(e)) + (1 | g)", {}
    design = build_design(formula, frame, family=spec, **extra)
    family = make_family(spec)
    args = design.X, design.y, design.row_weights, design.offset, family
    first, _ = glm_irls(*args, max_steps=1)
    np.testing.assert_allclose(working_start(design, family), first, rtol=1e-10)
    # glm.fit's first step written out (McCullagh & Nelder's working response and weights at R's mustart)
    y, a = design.y, design.row_weights
    if family_name == "binomial":  # logit: d mu / d eta = V(mu) = mu (1 - mu)
        mu = (a * y + 0.5) / (a + 1.0)
        eta, w, r = np.log(mu / (1 - mu)), a * mu * (1 - mu), (y - mu) / (mu * (1 - mu))
    else:  # log: d mu / d eta = V(mu) = mu
        mu = y + 0.1
        eta, w, r = np.log(mu), mu, (y - mu) / mu
    by_hand = np.linalg.solve(design.X.T @ (w[:, None] * design.X), design.X.T @ (w * (eta - design.offset + r)))
    np.testing.assert_allclose(first, by_hand, rtol=1e-9)
    beta, settled = glm_irls(*args)
    assert settled and not np.allclose(beta, first, rtol=1e-6)  # one step does not reach the fit
    mu = family.link.inverse(design.offset + design.X @ beta)
    score = design.X.T @ (design.row_weights * (design.y - mu))  # canonical links: X' a (y - mu) = 0
    assert np.max(np.abs(score)) < 1e-8


def test_unique_codes_is_numpy_s_unique_by_counting_or_by_sorting():
    # the grouping of a batch's rows: counting the codes present where their range is small, np.unique otherwise
    from hierpool.spec.design import unique_codes

    rng = np.random.default_rng(9)
    # counted: a small range, and one just inside the limit (4 x 400 + 1024); a range far beyond it and a negative
    # code are left to np.unique
    for size, shift in ((50, 0), (2624, 0), (10**7, 0), (50, -7)):
        codes = rng.choice(rng.choice(size, 30, replace=False), 400) + shift
        values, inverse = unique_codes(codes, size)
        expected_values, expected_inverse = np.unique(codes, return_inverse=True)
        np.testing.assert_array_equal(values, expected_values)
        np.testing.assert_array_equal(inverse, expected_inverse)
    # an interaction's levels as R's factor(a:b) orders them, unused combinations dropped
    from hierpool.spec.design import group_index

    frame = pd.DataFrame({"a": ["y", "x", "y", "x", "z"], "b": ["2", "1", "1", "1", "2"]})
    index, labels = group_index(frame, ("a", "b"))
    np.testing.assert_array_equal(labels, ["x:1", "y:1", "y:2", "z:2"])
    np.testing.assert_array_equal(index, [2, 0, 1, 0, 3])


def test_grouped_products_of_keys_in_order_equal_the_bincounts_of_the_same_rows_shuffled(monkeypatch):
    # from SORTED_KEYS_MIN_ROWS rows, keys in order are summed run by run (reduceat); shuffled, by bincount
    from hierpool.algebra import system
    from hierpool.algebra.system import SORTED_KEYS_MIN_ROWS, grouped_products

    found = []

    def recorded(keys):
        found.append(system_key_runs(keys))
        return found[-1]

    system_key_runs = system._key_runs
    monkeypatch.setattr(system, "_key_runs", recorded)
    rng = np.random.default_rng(5)
    n = SORTED_KEYS_MIN_ROWS + 17
    gaps = np.sort(rng.integers(3, 900, n))  # no key below 3
    gaps[gaps == 7] = 8  # nor 7: their sums are 0
    for keys in (gaps, np.full(n, 5)):  # many runs, and one
        left, right, weights = rng.normal(size=(n, 2)), rng.normal(size=(n, 3)), rng.uniform(0.5, 2.0, n)
        order = rng.permutation(n)
        for right_side in (left, right):  # symmetric and not
            found.clear()
            in_order = grouped_products(keys, left, right_side, weights, 900)
            assert found[-1] is not None  # the runs' path
            shuffled = grouped_products(keys[order], left[order], right_side[order], weights[order], 900)
            assert (found[-1] is None) == (keys is gaps)  # the bincounts' (one key: still in order shuffled)
            np.testing.assert_allclose(in_order, shuffled, rtol=1e-10, atol=1e-10)
            empty = np.setdiff1d(np.arange(900), keys)
            assert np.all(in_order[empty] == 0) and np.all(in_order[keys[0]] != 0)


def test_aliased_within_is_aliased_columns_dataset_by_dataset():
    # the batch's rank of X, as hp.lmm judges each dataset's (the eigenvalues of X'X called a column 20,000 +- 1
    # aliased with the intercept: their smallest is below eps times the largest)
    rng = np.random.default_rng(3)
    n_groups = 40
    group = rng.integers(0, n_groups - 1, 1200)  # the last group has no rows: all its columns count as aliased
    x, z = rng.normal(size=(2, group.size))
    X = np.column_stack([np.ones(group.size), x + 20000.0 * (group % 3 == 0), z, x + z])
    X[:, 3] += np.where(group % 4 == 0, 1e-3, 1e-12) * rng.normal(size=group.size)  # near aliased, or clearly not
    X[group % 5 == 0, 2] = 7.0  # a constant: aliased with the intercept there
    found = aliased_within(X, group, n_groups)
    for g in range(n_groups):
        expected = aliased_columns(X[group == g]) if np.any(group == g) else np.arange(X.shape[1])
        np.testing.assert_array_equal(found.get(g, np.zeros(0, int)), expected)
    assert {len(columns) for columns in found.values()} == {1, 4} and len(found) < n_groups


def test_solved_row_quadratic_forms_is_the_dense_quadratic_form_of_each_row(monkeypatch):
    # v_i = [x_i, slots scattered (two sharing a coordinate add)], B SPD; `measured` keeps the leading part of both
    # v and B^-1 v (a bordered system's constraint rows out).  Chunks of 3 rows: the loop's seams are crossed.
    from hierpool.algebra import linalg

    monkeypatch.setattr(linalg, "DIAGONAL_CHUNK", 3)
    rng = np.random.default_rng(4)
    size, n, p = 9, 8, 2
    a = rng.normal(size=(size, size))
    b = a @ a.T + size * np.eye(size)
    lead = rng.normal(size=(n, p))
    columns = [rng.integers(p, size, size=(n, 2)), np.full((n, 1), p + 1)]
    values = [rng.normal(size=(n, 2)), rng.normal(size=(n, 1))]
    v = np.zeros((n, size))
    v[:, :p] = lead
    for column, value in zip(columns, values):
        for slot in range(column.shape[1]):
            np.add.at(v, (np.arange(n), column[:, slot]), value[:, slot])
    solved = np.linalg.solve(b, v.T).T
    for measured in (None, size - 2):
        m = size if measured is None else measured
        expected = np.einsum("ij,ij->i", v[:, :m], solved[:, :m])
        got = linalg.solved_row_quadratic_forms(lambda r: np.linalg.solve(b, r), size, n, columns, values,
                                                lead=lead, measured=measured)
        np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_lme4_s_gradient_measure_is_min_of_g_and_solve_chol_h_g():
    """lme4's check.conv.grad: min(|g|, |solve(chol(H), g)|), chol(H) the upper factor R (H = R'R).  A non-diagonal
    H tells R^-1 g (lme4's) from L^-1 g; a Hessian with NaN (NumPy's Cholesky does not refuse it) gives |g|, as
    one without a factor does, not a NaN that max() then ignores."""
    from hierpool.algebra.checks import lme4_gradient_measure

    hessian, g = np.array([[4.0, 3.0], [3.0, 9.0]]), np.array([0.01, -0.02])
    # R's solve(chol(H), g) = (0.0107735, -0.0076980); L^-1 g (the lower factor's) would be (0.005, -0.0105848)
    np.testing.assert_allclose(lme4_gradient_measure(hessian, g), [0.01, 0.0076980], rtol=1e-4)
    np.testing.assert_array_equal(lme4_gradient_measure(np.array([[np.nan, 0.0], [0.0, 1.0]]), g), np.abs(g))
    np.testing.assert_array_equal(lme4_gradient_measure(np.array([[1.0, 2.0], [2.0, 1.0]]), g), np.abs(g))


# --- a batch's sums over rows: each distinct column of [z X] once, each statistic the cells' cross-products ---

def _rows_with_shared_columns(seed=5, n_datasets=4, ell=3):
    rng = np.random.default_rng(seed)
    dataset = np.repeat(np.arange(n_datasets), 30)
    dataset = dataset[dataset != 2]  # a dataset without rows: its sums are zero
    level = rng.integers(0, ell, dataset.size)
    x, u = rng.normal(size=(2, dataset.size))
    X = np.column_stack([np.ones(dataset.size), x, u])
    z = np.column_stack([np.ones(dataset.size), x])  # X's first two columns: summed once
    y = 1e4 + 2 * x + rng.normal(size=dataset.size)
    return rng, dataset, level, X, z, y


@pytest.mark.parametrize("weighted", [False, True])
def test_sufficient_statistics_are_each_cells_cross_products(weighted):
    from hierpool.algebra.linalg import distinct_block_columns

    rng, dataset, level, X, z, y = _rows_with_shared_columns()
    n_datasets, ell = 4, 3
    weights = rng.uniform(0.5, 2.0, dataset.size) if weighted else None
    offset = rng.normal(size=dataset.size)
    columns, (z_at, x_at) = distinct_block_columns(z, X)
    assert columns.shape[1] == 3 and z_at.tolist() == [0, 1] and x_at.tolist() == [0, 1, 2]
    stats = statistics.sufficient_statistics(dataset, level, X, z, y, n_datasets, ell, weights=weights, offset=offset)
    w = np.ones(dataset.size) if weights is None else weights
    for d in range(n_datasets):
        rows = dataset == d
        target = (y - offset)[rows]
        beta0 = np.linalg.lstsq(X[rows] * np.sqrt(w[rows])[:, None], target * np.sqrt(w[rows]), rcond=None)[0] \
            if rows.any() else np.zeros(3)
        np.testing.assert_allclose(stats.beta_shift[d], beta0, rtol=1e-9, atol=1e-9)
        r = target - X[rows] @ stats.beta_shift[d]
        wx = X[rows] * w[rows, None]
        np.testing.assert_allclose(stats.xtx[d], wx.T @ X[rows], rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(stats.xty[d], wx.T @ r, atol=1e-8)  # (zero to rounding: r is X's residual)
        np.testing.assert_allclose(stats.yty[d], r @ (w[rows] * r), rtol=1e-9)
        for lev in range(ell):
            cell = rows & (level == lev)
            wz = z[cell] * w[cell, None]
            np.testing.assert_allclose(stats.ztz[d, lev], wz.T @ z[cell], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(stats.ztx[d, lev], wz.T @ X[cell], rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(stats.zty[d, lev], wz.T @ (target - X[rows] @ stats.beta_shift[d])[
                level[rows] == lev], rtol=1e-9, atol=1e-8)
    assert np.all(stats.ztz[2] == 0) and stats.n.tolist() == [30, 30, 0, 30]


def test_blocks_moments_are_each_blocks_column_moments():
    # hp.fit_batch's conditioning sums each distinct column once and a column of ones not at all: the moments of
    # each block are column_moments' own, bit for bit, a group without rows included
    from hierpool.algebra.conditioning import blocks_moments, column_moments

    _, dataset, _, X, z, _ = _rows_with_shared_columns()
    blocks = [z, z[:, :1], np.column_stack([X, 1e6 + X[:, 2]])]
    for block, found in zip(blocks, blocks_moments(blocks, dataset, 5)):
        for mine, theirs in zip(found, column_moments(block, dataset, 5)):
            np.testing.assert_array_equal(mine, theirs)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_small_inverses_and_determinants_are_numpy_s(k):
    from hierpool.algebra.linalg import small_determinants, small_inverses

    rng = np.random.default_rng(k)
    a = rng.normal(size=(40, 5, k, k))
    np.testing.assert_allclose(small_determinants(a), np.linalg.det(a), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(small_inverses(a), np.linalg.inv(a), rtol=1e-10, atol=1e-12)


def test_pieces_read_as_the_list_np_split_gives():
    from hierpool.batch.results import Pieces

    values, starts = np.arange(10.0), np.array([0, 3, 3, 7, 10])
    pieces, split = Pieces(values, starts), np.split(values, starts[1:-1])
    assert len(pieces) == len(split) == 4
    for mine, theirs in zip(pieces, split, strict=True):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(pieces[-1], split[-1])
    np.testing.assert_array_equal(pieces[np.int64(2)], split[2])
    assert [len(p) for p in pieces[1:3]] == [0, 4]
    with pytest.raises(IndexError):
        _ = pieces[4]


@pytest.mark.parametrize("labels", ["mixed", "integers", "pieces"])
def test_a_batch_term_s_ranef_is_each_dataset_s_levels_coefficient_by_coefficient(labels):
    # the table is gathered from the datasets' values laid end to end; here it is built dataset by dataset, as a
    # loop over hp.lmm's ranef would: datasets of 2, 0 and 3 levels, integer labels in one and strings in another
    # (kept as they are, not all made strings), or integers in each (Python's, as hp.lmm's table holds), a failed
    # dataset's NaNs
    from hierpool.batch.results import BatchTerm, Pieces

    levels = [np.array([4, 7]), np.array([], dtype=object), np.array(["a", "b", "c"], dtype=object)]
    if labels == "integers":  # one dtype: laid end to end before they are made objects
        levels = [np.array([4, 7]), np.array([], dtype=np.int64), np.array([1, 2, 3])]
    rng = np.random.default_rng(3)
    b = [rng.normal(size=(2, 2)), np.zeros((0, 2)), np.full((3, 2), np.nan)]
    sd = [rng.uniform(size=(2, 2)), np.zeros((0, 2)), rng.uniform(size=(3, 2))]
    if labels == "pieces":  # one array's pieces, as the long-frame batch holds its labels and sds
        starts = np.array([0, 2, 2, 5])
        levels = Pieces(np.array([4, 7, "a", "b", "c"], dtype=object), starts)
        sd = Pieces(np.concatenate(sd), starts)
    term = BatchTerm(group="g", coef_names=("(Intercept)", "x"), covariance=np.zeros((3, 2, 2)), levels=levels,
                     b=b, cond_sd=sd)
    table = term.ranef(pd.Index(["d0", "d1", "d2"], name="study"))
    expected = [(label, "g", coef, level, b[d][i, c], sd[d][i, c])
                for d, label in enumerate(["d0", "d1", "d2"]) for c, coef in enumerate(["(Intercept)", "x"])
                for i, level in enumerate(np.asarray(levels[d], dtype=object))]  # an int stays an int
    assert list(table.columns) == ["study", "grpvar", "term", "grp", "condval", "condsd"]
    assert len(table) == 10 and table["grp"].dtype == object  # labels as hp.lmm's table holds them, not int64
    for row, want in zip(table.itertuples(index=False), expected, strict=True):
        assert row[:4] == want[:4] and type(row.grp) is type(want[3])
        np.testing.assert_array_equal(row[4:], want[4:])


def test_nan_rows_hold_each_dataset_s_levels_in_a_block_of_its_own_width():
    # a batch of small datasets and one of many levels: no block as wide as the widest for every dataset (one block
    # for all tripled a batch's peak memory: benchmarks/RESULTS.md, forty-fifth session)
    from hierpool.batch.results import NanRows

    rows = NanRows([2, 3, 500, 0], (2,), widths=[4, 4, 512, 4], dtype=np.float32)
    assert {w: b.shape for w, b in rows.blocks.items()} == {4: (3, 4, 2), 512: (1, 512, 2)}
    assert [v.shape for v in rows] == [(2, 2), (3, 2), (500, 2), (0, 2)] and rows[0].dtype == np.float32
    rows.write(np.array([1, 0]), np.arange(16.0).reshape(2, 4, 2))  # a chunk's padded levels beyond a view's rows
    np.testing.assert_array_equal(rows[1], np.arange(6.0).reshape(3, 2))
    np.testing.assert_array_equal(rows[-4], np.arange(8.0, 12.0).reshape(2, 2))
    assert np.all(np.isnan(rows[2])) and len(rows) == 4 and len(rows[1:3]) == 2
    with pytest.raises(IndexError):
        rows[4]


def test_nan_rows_are_a_list_that_lays_its_rows_end_to_end():
    """Assigning an item writes it into its block (a refit's row); one of another dtype is kept as it is (a float32
    batch's row refitted in float64), until a chunk writes it again.  :func:`end_to_end` reads the blocks whole,
    equal to the items laid end to end, with padding, several widths and kept items."""
    from hierpool.batch.results import NanRows, end_to_end

    rows = NanRows([2, 3, 5, 1], (2,), widths=[4, 4, 8, 4], dtype=np.float32)
    rows.write(np.array([0, 1, 3]), np.arange(24.0).reshape(3, 4, 2))
    rows[2] = np.ones((5, 2), dtype=np.float32)
    assert rows[2].base is not None and not rows.kept  # (written into its block)
    rows[1] = np.full((3, 2), 0.5)  # float64: kept
    assert rows[1].dtype == np.float64 and 1 in rows.kept
    for laid, counts in (end_to_end(rows), end_to_end([np.asarray(rows[d]) for d in range(4)])):
        assert counts.tolist() == [2, 3, 5, 1]
    np.testing.assert_array_equal(end_to_end(rows)[0], np.concatenate([rows[d] for d in range(4)]))
    rows.write(np.array([1]), np.zeros((1, 4, 2)))  # a chunk's write replaces the kept item
    assert not rows.kept and rows[1].dtype == np.float32
    laid = end_to_end(rows)[0]
    np.testing.assert_array_equal(laid, np.concatenate([rows[d] for d in range(4)]))
    assert laid.dtype == np.float32 and laid.shape == (11, 2)
    # an item kept with another count of rows than its dataset's levels is counted as it is
    rows[3] = np.zeros((4, 2))
    laid, counts = end_to_end(rows)
    assert counts.tolist() == [2, 3, 5, 4] and len(laid) == 14
    np.testing.assert_array_equal(laid[-4:], 0.0)
    # one block without padding: the block itself, in the datasets' order
    whole = NanRows([3, 3], (2, 2))
    whole[1] = np.arange(12.0).reshape(3, 2, 2)
    assert np.shares_memory(end_to_end(whole)[0], whole.blocks[3])
    np.testing.assert_array_equal(end_to_end(whole)[0][3:], np.arange(12.0).reshape(3, 2, 2))


def test_a_varying_zero_varies_under_vmap_where_its_value_does_and_is_zero_whatever_the_value():
    # a vmapped loop's carry started from it varies from the start (the loop traced once)
    from hierpool.algebra.varying import varying_zero

    values = jnp.asarray([1.5, np.nan, -np.inf])
    zeros = jax.vmap(lambda v: varying_zero(v, v.dtype))(values)
    assert zeros.dtype == values.dtype and np.array_equal(zeros, np.zeros(3))
    assert jax.vmap(varying_zero)(jnp.arange(3, dtype=jnp.uint32)).tolist() == [0, 0, 0]
    for varying in (values, jnp.arange(3, dtype=jnp.uint32), jnp.arange(3) > 0):  # (isfinite of an int is constant)
        with pytest.raises(ValueError, match="out_axes"):  # out_axes=None: vmap refuses an output that varies
            jax.vmap(varying_zero, out_axes=None)(varying)
